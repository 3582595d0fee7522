"""A 4-trial raydpo sweep (2 betas x 2 loss types) against the same 4 runs done one after another
with TRL 1.16's DPOTrainer, on compare_trl.py's model and rows. Total wall time, end to end.

    .venv/bin/python bench/sweep_vs_trl.py [--steps 8]

raydpo: one `raydpo.tune.sweep` call (grid search, no early stopping so every trial runs all its
steps) with precomputed reference log-probs: the driver tokenizes once and scores the rows with the
reference once, then the trials train concurrently on the shared columns. TRL: four DPOTrainer runs
in one process, each loading its policy and reference and computing reference log-probs in the step
(TRL's default). Times include model loading and data preparation on both sides; raydpo's include
starting Ray.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.compare_trl import PROFILE, benchmark_rows, build_model  # noqa: E402

BETAS, LOSS_TYPES = [0.1, 0.5], ["sigmoid", "ipo"]


def run_trl_grid(model_dir: str, rows: list, steps: int) -> float:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    for beta in BETAS:
        for loss_type in LOSS_TYPES:
            with tempfile.TemporaryDirectory() as output_dir:
                args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=PROFILE["batch"], max_steps=steps,
                                 max_length=PROFILE["max_length"], learning_rate=1e-5, logging_steps=1, beta=beta,
                                 loss_type=loss_type, save_strategy="no", report_to="none", use_cpu=True,
                                 bf16=False, fp16=False, dataloader_num_workers=0, seed=0, disable_tqdm=True)
                DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir),
                           ref_model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                           train_dataset=Dataset.from_list(rows),
                           processing_class=AutoTokenizer.from_pretrained(model_dir)).train()
    return time.perf_counter() - started


def run_raydpo_sweep(model_dir: str, rows: list, steps: int, concurrency: Optional[int] = None) -> float:
    from ray import tune

    from raydpo import DPOConfig
    from raydpo.tune import sweep

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=PROFILE["batch"], max_steps=steps,
                         max_length=PROFILE["max_length"], learning_rate=1e-5, logging_steps=1, save_steps=10 ** 6,
                         seed=0, precompute_ref_log_probs=True, precompute_ref_cache_dir=None)
        result = sweep(model_dir, rows, {"beta": tune.grid_search(BETAS), "loss_type": tune.grid_search(LOSS_TYPES)},
                       args=args, scheduler=None, name="bench", max_concurrent_trials=concurrency)
        assert len(result.table) == 4 and all(row["status"] == "ok" for row in result.table), result.table
    return time.perf_counter() - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--work-dir", default=os.path.expanduser("~/.cache/raydpo/bench"))
    parser.add_argument("--concurrency", type=int, default=None,
                        help="raydpo's max_concurrent_trials (default: the sweep's own, 1 on 2 cores)")
    parser.add_argument("--run", choices=["trl", "raydpo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir = build_model(os.path.join(args.work_dir, PROFILE["name"]))
    rows = benchmark_rows(model_dir, PROFILE["batch"] * args.steps)
    if args.run:
        seconds = (run_trl_grid(model_dir, rows, args.steps) if args.run == "trl"
                   else run_raydpo_sweep(model_dir, rows, args.steps, args.concurrency))
        print(f"RESULT {seconds}", flush=True)
        return

    totals = {}
    for system in ("trl", "raydpo"):  # each in its own process
        concurrency = ["--concurrency", str(args.concurrency)] if args.concurrency else []
        proc = subprocess.run([sys.executable, __file__, "--run", system, "--steps", str(args.steps),
                               "--work-dir", args.work_dir, *concurrency], capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"{system} failed (exit {proc.returncode})")
        totals[system] = float(lines[-1].split()[1])
    print(f"\n4 trials ({' x '.join(map(str, BETAS))} beta, {' x '.join(LOSS_TYPES)}), {args.steps} steps each")
    print(f"{'system':<36}{'total s':>9}{'speed-up':>10}")
    print(f"{'TRL, 4 runs one by one':<36}{totals['trl']:>9.0f}{'1.00x':>10}")
    label = f"raydpo sweep, {args.concurrency or 'default'} concurrent"
    print(f"{label:<36}{totals['raydpo']:>9.0f}{totals['trl'] / totals['raydpo']:>9.2f}x")


if __name__ == "__main__":
    main()
