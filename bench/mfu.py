"""The machine's matrix-multiply ceiling, and a DPO step's model FLOPs and hardware FLOPs (counted by
raydpo/flops.py, whose docstring says how), for MFU and HFU.

    .venv/bin/python bench/mfu.py [--threads 2] [--size 2048]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from raydpo.data.batching import collate  # noqa: E402
from raydpo.flops import hardware_flops, matmul_parameters, step_flops  # noqa: E402


def matmul_flops_per_second(threads: int, size: int = 2048, repeats: int = 5, gpu_bf16: bool = False) -> float:
    """Best matmul rate: fp32 on CPU at this thread count, or bf16 on the GPU (size 8192): the
    ceiling MFU is measured against."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if gpu_bf16:
            size = max(size, 8192)
            a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        else:
            a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm up
        best = min(_timed(lambda: a @ b, gpu_bf16) for _ in range(repeats))
    finally:
        torch.set_num_threads(previous)
    return 2 * size ** 3 / best


def _timed(fn, synchronize: bool = False) -> float:
    if synchronize:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if synchronize:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=2048)
    args = parser.parse_args()
    from bench.compare_trl import model_config

    config = model_config()
    rate = matmul_flops_per_second(args.threads, args.size)
    lengths = [256] * 8  # batch 4: 4 chosen + 4 rejected sequences of 256 tokens
    print(f"{'quantity':<44}{'value':>14}")
    print(f"{'fp32 matmul ceiling, ' + str(args.threads) + ' threads (GFLOP/s)':<44}{rate / 1e9:>14.1f}")
    print(f"{'matmul parameters (M)':<44}{matmul_parameters(config) / 1e6:>14.2f}")
    print(f"{'step GFLOP, batch 4 x 256, with reference':<44}{step_flops(config, lengths) / 1e9:>14.1f}")
    print(f"{'step GFLOP, batch 4 x 256, precomputed ref':<44}{step_flops(config, lengths, False) / 1e9:>14.1f}")
    # the same 4 pairs (128-token prompt, 128-token completions) as raydpo runs them, reference in the step
    pairs = [{"prompt_ids": [2] * 128, "chosen_ids": [3] * 128, "rejected_ids": [4] * 128}] * 4
    for label, share in (("padded", False), ("shared prompt", True)):
        ran = hardware_flops(config, collate(pairs, 1, 256, share_prompt=share))
        print(f"{'hardware GFLOP, ' + label + ', with reference':<44}{ran / 1e9:>14.1f}")


if __name__ == "__main__":
    main()
