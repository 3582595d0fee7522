"""Reference modes side by side: in the worker (1), precomputed by the actor pool (3), streamed by the
pool while training runs (4), and a second precomputed run that finds its log-probs in the cache.

    .venv/bin/python bench/reference_modes.py [--steps 8] [--warmup 2]

The model, rows and batch are bench/compare_trl.py's (a 22M-parameter Qwen3 shape, random weights,
batch 4, max_length 256, fp32), one training worker, each mode in its own process. Reported:
- s/step: mean wall time per optimizer step after the warm-up (the precompute is not in it);
- train() s: the whole DPOTrainer.train() call: the precompute, worker start-up and every step;
- worker peak GiB: the highest resident memory of the Ray Train worker (the actors not counted: they
  run on their own resources);
- outside steps s: train() less the steps: starting Ray Train's worker, loading the model, and
  the reference precompute when the mode has one (so the precompute is this column less the
  in-worker row's).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare_trl import PROFILE, build_model, run_system  # noqa: E402

MODES = [("in-worker", "raydpo-1"), ("precomputed", "raydpo-1-pre"), ("streamed", "raydpo-1-stream"),
         ("precomputed, cache filled", "raydpo-1-pre-cache"), ("precomputed, cache hit", "raydpo-1-pre-cache")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/raydpo/bench"))
    args = parser.parse_args()
    build_model(os.path.join(args.work_dir, PROFILE["name"]))
    results = []
    with tempfile.TemporaryDirectory() as cache_dir:
        os.environ["RAYDPO_BENCH_REF_CACHE"] = cache_dir  # fresh: the first "-cache" run fills it
        for label, system in MODES:
            result = run_system(system, args.steps, args.work_dir, "cpu")
            times = result["step_times"][args.warmup:]
            results.append({"mode": label, "s/step": sum(times) / len(times), "steps s": sum(result["step_times"]),
                            "train s": result["wall"], "peak GiB": result["peak_rss"] / 2 ** 30})
            print(f"[bench] {label}: train() {result['wall']:.0f} s", flush=True)
    base = results[0]
    print(f"\n{PROFILE['name']}, batch {PROFILE['batch']}, max_length {PROFILE['max_length']}, {args.steps} steps, "
          f"1 worker, fp32, {os.cpu_count()} CPUs")
    header = f"{'mode':<28}{'s/step':>8}{'train() s':>11}{'outside steps s':>17}{'worker peak GiB':>17}{'vs in-worker':>14}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(f"{r['mode']:<28}{r['s/step']:>8.2f}{r['train s']:>11.1f}{r['train s'] - r['steps s']:>17.1f}"
              f"{r['peak GiB']:>17.2f}"
              f"{r['peak GiB'] / base['peak GiB']:>13.2f}x")


if __name__ == "__main__":
    main()
