"""Peak memory of completion log-probs: a plain full-vocabulary log-softmax against raydpo's chunked
computation (raydpo/logprobs.py), at vocabulary 32k and sequence 1024, for the policy (log-probs,
token metrics and backward) and the reference (log-probs under no_grad).

    .venv/bin/python bench/logprob_memory.py [--batch 2] [--vocab 32000] [--seq 1024] [--chunk 256]

Each measurement runs in a fresh process. On a GPU it reports torch's peak allocation; on CPU, the
process's peak resident memory (VmHWM, reset after the inputs exist). Both count memory above the
inputs (the logits), so the policy rows include the logits' own gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch


def naive(logits, input_ids, mask, metrics):
    """What a straightforward implementation does: one [N, T, V] float32 log-softmax, kept for backward."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    token = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    m = mask[:, 1:].float()
    if not metrics:
        return (token * m).sum(1), []
    with torch.no_grad():  # the token metrics, from the same full tensor
        entropy = -(logp.exp() * logp).sum(-1)
        top1 = (logp.argmax(-1) == input_ids[:, 1:]).float()
        mean_logits = logits[:, :-1].float().mean(-1)
    return (token * m).sum(1), [(t * m).sum() for t in (entropy, top1, mean_logits)]


def chunked(logits, input_ids, mask, metrics, chunk_size):
    from raydpo.logprobs import completion_stats

    s = completion_stats(logits, input_ids, mask, metrics=metrics, chunk_size=chunk_size or None)
    return s.logps, [s.entropy.sum(), s.correct.sum(), s.mean_logits.sum()] if metrics else []


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(method: str, dtype: str, role: str, args) -> dict:
    policy = role == "policy"
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    n, t, v = 2 * args.batch, args.seq, args.vocab  # chosen + rejected rows
    logits = torch.randn(n, t, v, device=device, dtype=getattr(torch, dtype)).requires_grad_(policy)
    input_ids = torch.randint(0, v, (n, t), device=device)
    mask = torch.zeros(n, t, dtype=torch.long, device=device)
    mask[:, t // 4:] = 1  # a quarter prompt, the rest completion
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        base = _rss_mb("VmRSS:")
    with torch.set_grad_enabled(policy):
        if method == "naive":
            logps, metrics = naive(logits, input_ids, mask, policy)
        else:
            logps, metrics = chunked(logits, input_ids, mask, policy, args.chunk)
    if policy:
        logps.sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = _rss_mb("VmHWM:") - base
    return {"peak_mb": peak, "logps": logps.tolist(), "metrics": [m.item() for m in metrics],
            "grad_sum": logits.grad.float().abs().sum().item() if policy else 0.0}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1, help="pairs (2 sequences each)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=0, help="positions per chunk; 0: raydpo's default")
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "DTYPE", "ROLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one, args)))
        return

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (peak RSS)"
    elements = 2 * args.batch * args.seq * args.vocab
    from raydpo.logprobs import CHUNK_ELEMENTS

    chunk = args.chunk or max(1, CHUNK_ELEMENTS // (2 * args.batch * args.vocab))
    print(f"logits [{2 * args.batch}, {args.seq}, {args.vocab}], chunk {chunk} positions, on {device}; "
          "peak memory above the inputs\n")
    print("| role | logits dtype | logits MB | naive peak MB | chunked peak MB | same values |")
    print("|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for role, dtype in [(r, d) for r in ("policy", "reference") for d in ("float32", "bfloat16")]:
        runs = {}
        for method in ("naive", "chunked"):
            cmd = [sys.executable, __file__, "--one", method, dtype, role, "--batch", str(args.batch), "--vocab",
                   str(args.vocab), "--seq", str(args.seq), "--chunk", str(args.chunk)]
            runs[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                     env=env).stdout.strip().splitlines()[-1])
        a, b = runs["naive"], runs["chunked"]
        close = (torch.allclose(torch.tensor(a["logps"]), torch.tensor(b["logps"]), rtol=1e-5, atol=1e-3)
                 and len(a["metrics"]) == len(b["metrics"])
                 and torch.allclose(torch.tensor(a["metrics"]), torch.tensor(b["metrics"]), rtol=1e-4)
                 and abs(a["grad_sum"] - b["grad_sum"]) <= 1e-3 * abs(a["grad_sum"]))
        role_name = "policy: log-probs, metrics, backward" if role == "policy" else "reference: log-probs, no_grad"
        logits_mb = elements * (4 if dtype == "float32" else 2) / 2 ** 20
        print(f"| {role_name} | {dtype} | {logits_mb:.0f} | {a['peak_mb']:.0f} | {b['peak_mb']:.0f} | "
              f"{'yes' if close else 'NO'} |")


if __name__ == "__main__":
    main()
