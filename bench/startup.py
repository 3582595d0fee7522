"""Start-up of short runs in one warm Ray session: where the time goes before the first step.

    .venv/bin/python bench/startup.py [--runs 6] [--workers 1,2] [--steps 2]   (--workers 0: local mode)

One driver, one embedded Ray session, `--runs` short `DPOTrainer(...).train()` calls back to back, as a
notebook or a script looping over configs makes them: a tiny random Llama (hidden 64, 2 layers), 40
parity pairs, max_length 32, `--steps` steps, alternating over `--workers` training workers. The first
run also pays the session's own start (Ray's worker pool, imports in the driver) and is shown apart.

Per run it prints the phases of TrainOutput.startup (raydpo/train/startup.py; seconds, wall clock):
- tokenize: the DPOTrainer constructor (tokenization and checks through Ray Data), on the driver;
- worker group: fit() until rank 0's process exists (the history actor, Ray Train's controller,
  the placement group, the worker processes);
- imports: rank 0's process start until the loop runs (module imports, torch.distributed's group);
- data, model, deepspeed, reference, first step: the loop's own phases;
- to step 1: the DPOTrainer constructor plus fit() until the first optimizer step's end;
- after: the rest of train() (later steps, the checkpoint, shutting the worker group down);
- run: the whole constructor plus train().
The median of the warm runs' "to step 1", per worker count, is the number the start-up target (15 s)
is about. 0 workers is local mode (num_workers=0: the loop in this process, so no worker group).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = ["tokenize", "worker group", "imports and process group", "data shard", "model load", "deepspeed init",
           "reference", "first step"]
SHORT = {"imports and process group": "imports", "data shard": "data", "model load": "model",
         "deepspeed init": "deepspeed"}


def one_run(model: str, rows: list, workers: int, steps: int, output_dir: str) -> dict:
    from raydpo import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=output_dir, num_workers=workers, max_steps=steps, logging_steps=1,
                       per_device_train_batch_size=4, max_length=32, learning_rate=1e-3, report_to="none")
    started = time.perf_counter()
    trainer = DPOTrainer(model, args=config, train_dataset=rows)
    tokenized = time.perf_counter()
    out = trainer.train()
    finished = time.perf_counter()
    phases = dict(out.startup)
    phases["tokenize"] = tokenized - started
    phases["to step 1"] = phases["tokenize"] + phases["total"]
    phases["run"] = finished - started
    phases["after"] = phases["run"] - phases["to step 1"]
    return phases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts, used in turn")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]

    from raydpo import cluster
    from raydpo.models import build_tiny_model
    from raydpo.tasks import parity_pairs

    rows = parity_pairs(40, seed=1)
    with tempfile.TemporaryDirectory() as work:
        model = build_tiny_model(os.path.join(work, "model"),
                                 [r["prompt"] + r["chosen"] + r["rejected"] for r in rows])
        session_start = time.perf_counter()
        cluster.connect("local")
        print(f"ray.init: {time.perf_counter() - session_start:.1f} s")
        results = []
        for i in range(args.runs):
            n = workers[i % len(workers)]
            results.append((n, one_run(model, rows, n, args.steps, os.path.join(work, f"run{i}"))))

    names = COLUMNS + ["to step 1", "after", "run"]
    header = f"{'run':>4} {'workers':>7} " + " ".join(f"{SHORT.get(n, n):>12}" for n in names)
    print(header)
    print("-" * len(header))
    for i, (n, phases) in enumerate(results):
        print(f"{i:>4} {n:>7} " + " ".join(f"{phases.get(name, float('nan')):>12.2f}" for name in names))
    for n in workers:  # run 0 paid the session's own start; 0 workers is local mode (no worker group)
        warm = [phases for i, (count, phases) in enumerate(results) if i and count == n]
        if warm:
            print(f"{f'median, warm, {n} workers':>20} " + " ".join(
                f"{statistics.median(p.get(name, 0.0) for p in warm):>12.2f}" for name in names))


if __name__ == "__main__":
    main()
