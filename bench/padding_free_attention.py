"""Padding-free rows under sdpa: attention per segment (raydpo/segment_attention.py) against the whole
row under its dense block-diagonal mask, on the real model.

    .venv/bin/python bench/padding_free_attention.py [--pairs 4] [--batches 4] [--repeats 3]

SmolLM2-135M-Instruct (fp32, sdpa) on real hh-rlhf pairs (bench/compare_trl.py's rows and tokenizer
rule), max_length 512: for consecutive micro-batches of `--pairs` pairs, one policy forward and
backward through raydpo's log-probs (`model_completion_stats`, the LM head only on completion
tokens), with and without the segments, for share_prompt on and off. Prints the best of `--repeats`
per batch and the total, in one process: the same model, rows, threads and precision on both sides.
The log-probs of both are checked equal (1e-5) before anything is timed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("RAYDPO_BENCH_PROFILE", "smollm2")

import compare_trl  # noqa: E402  (the bench's rows and tokenization)

import raydpo.logprobs as logprobs  # noqa: E402
from raydpo.data.batching import collate  # noqa: E402
from raydpo.models import smollm2_path  # noqa: E402

WITH_SEGMENTS = logprobs.segment_kwargs


def without_segments(*args):
    return {}


def step_seconds(model, batch, segments: bool, repeats: int) -> tuple:
    logprobs.segment_kwargs = WITH_SEGMENTS if segments else without_segments
    best, logps = float("inf"), None
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        started = time.perf_counter()
        stats = logprobs.model_completion_stats(model, batch)
        stats.logps.sum().backward()
        best = min(best, time.perf_counter() - started)
        logps = stats.logps.detach()
    return best, logps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    rows = compare_trl.tokenized_rows(path, compare_trl.hh_rlhf_rows(args.pairs * args.batches))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    print(f"smollm2-135m, fp32, sdpa, {args.pairs} pairs per micro-batch, max_length 512, policy forward and "
          f"backward, best of {args.repeats}, {torch.get_num_threads()} threads")
    print(f"{'share_prompt':>12} {'batch':>5} {'row':>5} {'segments (tokens)':<34} {'dense s':>8} "
          f"{'segments s':>10} {'speed-up':>8}")
    for share in (True, False):
        totals = [0.0, 0.0]
        for b in range(args.batches):
            batch = collate(rows[b * args.pairs:(b + 1) * args.pairs], 0, max_length=512, padding_free=True,
                            share_prompt=share)
            dense, dense_logps = step_seconds(model, batch, False, args.repeats)
            segmented, segment_logps = step_seconds(model, batch, True, args.repeats)
            torch.testing.assert_close(segment_logps, dense_logps, rtol=1e-5, atol=1e-5)
            totals[0] += dense
            totals[1] += segmented
            spans = ",".join(str(end - start) for start, end, _ in batch.segments)
            print(f"{str(share):>12} {b:>5} {batch.input_ids.shape[1]:>5} {spans:<34} {dense:>8.2f} "
                  f"{segmented:>10.2f} {dense / segmented:>7.2f}x")
        print(f"{str(share):>12} {'all':>5} {'':>5} {'':<34} {totals[0]:>8.2f} {totals[1]:>10.2f} "
              f"{totals[0] / totals[1]:>7.2f}x")


if __name__ == "__main__":
    main()
