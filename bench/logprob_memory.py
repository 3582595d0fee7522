"""Peak memory of completion log-probs from the LM head on: a plain full-vocabulary log-softmax, raydpo's
chunked log-softmax over the full logits (raydpo/logprobs.py `completion_stats`), and raydpo's chunked
LM head (`head_completion_stats`, which never holds the [N, T, V] logits), for the policy (log-probs,
token metrics and backward) and the reference (log-probs under no_grad).

    .venv/bin/python bench/logprob_memory.py [--batch 1] [--vocab 151936] [--hidden 576] [--seq 1024] [--chunk 256]

Every method starts from the same inputs, the final hidden states [N, T, H] and the LM head [V, H], and
runs the head itself. Each measurement runs in a fresh process. On a GPU it reports torch's peak
allocation; on CPU, the process's peak resident memory (VmHWM, reset after the inputs exist). Both count
memory above the inputs, so the policy rows include the hidden states' and the head's gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

METHODS = ("naive", "chunked", "chunked-head")


def naive(head, hidden, input_ids, mask, metrics):
    """What a straightforward implementation does: the whole logits, one [N, T, V] float32 log-softmax, kept for backward."""
    logits = head(hidden)
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


def chunked(head, hidden, input_ids, mask, metrics, chunk_size, whole_head: bool):
    from raydpo.logprobs import completion_stats, head_completion_stats

    if whole_head:
        s = completion_stats(head(hidden), input_ids, mask, metrics=metrics, chunk_size=chunk_size or None)
    else:
        s = head_completion_stats(head, hidden, input_ids, mask, metrics=metrics, chunk_size=chunk_size or None)
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
    head = torch.nn.Linear(args.hidden, v, bias=False).to(device=device, dtype=getattr(torch, dtype))
    head.requires_grad_(policy)
    hidden = torch.randn(n, t, args.hidden, device=device, dtype=getattr(torch, dtype)).requires_grad_(policy)
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
            logps, metrics = naive(head, hidden, input_ids, mask, policy)
        else:
            logps, metrics = chunked(head, hidden, input_ids, mask, policy, args.chunk, whole_head=method == "chunked")
    if policy:
        logps.sum().backward()
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        peak = _rss_mb("VmHWM:") - base
    grad_sum = hidden.grad.float().abs().sum().item() + head.weight.grad.float().abs().sum().item() if policy else 0.0
    return {"peak_mb": peak, "logps": logps.tolist(), "metrics": [m.item() for m in metrics], "grad_sum": grad_sum}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1, help="pairs (2 sequences each)")
    parser.add_argument("--vocab", type=int, default=151936, help="default: Qwen2/3's vocabulary")
    parser.add_argument("--hidden", type=int, default=576, help="default: SmolLM2-135M's width")
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
    print(f"hidden [{2 * args.batch}, {args.seq}, {args.hidden}], LM head [{args.vocab}, {args.hidden}], "
          f"chunk {chunk} positions, on {device}; peak memory above the inputs\n")
    print("| role | dtype | logits MB | naive peak MB | chunked peak MB | chunked head peak MB | same values |")
    print("|---|---|---|---|---|---|---|")
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for role, dtype in [(r, d) for r in ("policy", "reference") for d in ("float32", "bfloat16")]:
        runs = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, "--one", method, dtype, role, "--batch", str(args.batch), "--vocab",
                   str(args.vocab), "--hidden", str(args.hidden), "--seq", str(args.seq), "--chunk", str(args.chunk)]
            runs[method] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True,
                                                     env=env).stdout.strip().splitlines()[-1])
        a = runs["naive"]
        close = all(torch.allclose(torch.tensor(a["logps"]), torch.tensor(b["logps"]), rtol=1e-5, atol=1e-3)
                    and len(a["metrics"]) == len(b["metrics"])
                    and torch.allclose(torch.tensor(a["metrics"]), torch.tensor(b["metrics"]), rtol=1e-4)
                    and abs(a["grad_sum"] - b["grad_sum"]) <= 1e-3 * abs(a["grad_sum"])
                    for b in (runs["chunked"], runs["chunked-head"]))
        role_name = "policy: log-probs, metrics, backward" if role == "policy" else "reference: log-probs, no_grad"
        logits_mb = elements * (4 if dtype == "float32" else 2) / 2 ** 20
        peaks = " | ".join(f"{runs[m]['peak_mb']:.0f}" for m in METHODS)
        print(f"| {role_name} | {dtype} | {logits_mb:.0f} | {peaks} | {'yes' if close else 'NO'} |")


if __name__ == "__main__":
    main()
