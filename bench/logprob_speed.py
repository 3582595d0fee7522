"""Time of the chunked log-probs over the vocabulary (raydpo/logprobs.py `_ChunkedTokenLogps`): the forward
with and without the token metrics (the policy's and the reference's cases) and the backward, from given
float32 logits, best of --repeats. No model: only the [N, T, V] passes this function makes.

    .venv/bin/python bench/logprob_speed.py [--rows 8] [--positions 100] [--vocab 49152] [--repeats 5]

The default shape is ~800 scored positions of SmolLM2's vocabulary: a micro-batch of 4 hh-rlhf pairs
(chosen and rejected completions of ~100 tokens). Run it at two commits to compare implementations; set
raydpo's CPU worker malloc variables (raydpo.cluster.cpu_process_env) to time what a worker sees.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raydpo.logprobs import _ChunkedTokenLogps, _chunk_size  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--positions", type=int, default=100)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.positions + 1, args.vocab) * 3
    labels = torch.randint(0, args.vocab, (args.rows, args.positions))
    upstream = torch.randn(args.rows, args.positions)
    print(f"logits [{args.rows}, {args.positions + 1}, {args.vocab}] float32, {torch.get_num_threads()} threads, "
          f"chunk {_chunk_size(logits, None)} positions; best of {args.repeats} (ms)")
    print(f"{'case':<28}{'forward':>10}{'backward':>10}")
    for name, metrics in (("reference (log-probs)", False), ("policy (log-probs, metrics)", True)):
        forward = backward = float("inf")
        for _ in range(args.repeats):
            x = logits.clone().requires_grad_(True)
            start = time.perf_counter()
            logps = _ChunkedTokenLogps.apply(x, labels, _chunk_size(logits, None), metrics, False)[0]
            middle = time.perf_counter()
            (logps * upstream).sum().backward()
            forward, backward = min(forward, middle - start), min(backward, time.perf_counter() - middle)
        print(f"{name:<28}{forward * 1000:>10.0f}{backward * 1000:>10.0f}")


if __name__ == "__main__":
    main()
