"""Start-up of short runs in one warm Ray session: where the time goes before the first step.

    .venv/bin/python bench/startup.py [--runs 6] [--workers 1,2] [--steps 2] [--by-process]   (--workers 0: local mode)

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
- run: the whole constructor plus train();
- CPU s: the machine's CPU seconds over the run (constructor plus train(), every process: user, nice
  and system time, psutil.cpu_times). On a 2-core machine a run's start is
  CPU-bound, and this column moves far less with the machine's speed of the hour than the wall clock;
  it counts other load too, so run the bench on an otherwise idle machine.
With --by-process it also prints, per worker count, the median CPU seconds of a warm run by process
kind (Ray's process title, e.g. "ray::TrainController"; every process's CPU times sampled every 0.1 s,
so a process that lives less than that is missed).
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
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = ["tokenize", "worker group", "imports and process group", "data shard", "model load", "deepspeed init",
           "reference", "first step"]
SHORT = {"imports and process group": "imports", "data shard": "data", "model load": "model",
         "deepspeed init": "deepspeed"}


def machine_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent in user, nice and system time since boot."""
    import psutil

    times = psutil.cpu_times()
    return times.user + getattr(times, "nice", 0.0) + times.system


class ProcessCPU:
    """CPU seconds per process kind over a window, from every process's CPU times sampled by a daemon
    thread every `interval` s."""

    def __init__(self, interval: float = 0.1):
        import threading

        self.interval, self.seen = interval, {}  # pid -> [kind, CPU seconds so far]
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self):
        import psutil

        while True:
            for process in psutil.process_iter(["cmdline", "cpu_times"]):
                title, times = (process.info["cmdline"] or [""])[0], process.info["cpu_times"]
                if times is None:  # gone, or not ours to read
                    continue
                kind = title.split(".")[0] if title.startswith("ray::") else os.path.basename(title.split(" ")[0])
                entry = self.seen.setdefault(process.pid, [kind, 0.0])
                if kind.startswith("ray::") and kind not in ("ray::IDLE", "ray::"):
                    entry[0] = kind  # an idle pooled worker takes on the actor's or task's title
                entry[1] = times.user + times.system
            time.sleep(self.interval)

    def window(self) -> Callable[[], dict]:
        """Start a window now; the returned function ends it and gives {kind: CPU seconds} within it."""
        start = {pid: cpu for pid, (_, cpu) in list(self.seen.items())}  # the thread adds entries meanwhile

        def end() -> dict:
            by_kind = {}
            for pid, (kind, last) in list(self.seen.items()):
                spent = last - start[pid] if pid in start else last  # a new process: all of its CPU
                if spent > 0:
                    by_kind[kind] = by_kind.get(kind, 0.0) + spent
            return by_kind

        return end


def one_run(model: str, rows: list, workers: int, steps: int, output_dir: str) -> dict:
    from raydpo import DPOConfig, DPOTrainer

    config = DPOConfig(output_dir=output_dir, num_workers=workers, max_steps=steps, logging_steps=1,
                       per_device_train_batch_size=4, max_length=32, learning_rate=1e-3, report_to="none")
    cpu_before, started = machine_cpu_seconds(), time.perf_counter()
    trainer = DPOTrainer(model, args=config, train_dataset=rows)
    tokenized = time.perf_counter()
    out = trainer.train()
    finished, cpu_after = time.perf_counter(), machine_cpu_seconds()
    phases = dict(out.startup)
    phases["tokenize"] = tokenized - started
    phases["to step 1"] = phases["tokenize"] + phases["total"]
    phases["run"] = finished - started
    phases["after"] = phases["run"] - phases["to step 1"]
    phases["CPU s"] = cpu_after - cpu_before
    return phases


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts, used in turn")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--by-process", action="store_true", help="CPU seconds of a warm run by process kind")
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
        results, by_process = [], []
        sampler = ProcessCPU() if args.by_process else None
        for i in range(args.runs):
            n = workers[i % len(workers)]
            end = sampler.window() if sampler else None
            results.append((n, one_run(model, rows, n, args.steps, os.path.join(work, f"run{i}"))))
            by_process.append(end() if end else {})

    names = COLUMNS + ["to step 1", "after", "run", "CPU s"]
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
    if args.by_process:
        print_by_process(workers, [n for n, _ in results], by_process)


def print_by_process(workers: list, counts: list, by_process: list):
    """Per worker count, the median CPU seconds of the warm runs by process kind, largest first."""
    for n in workers:
        warm = [cpu for i, (count, cpu) in enumerate(zip(counts, by_process)) if i and count == n]
        if not warm:
            continue
        kinds = {kind for cpu in warm for kind in cpu}
        medians = {kind: statistics.median(cpu.get(kind, 0.0) for cpu in warm) for kind in kinds}
        print(f"\nCPU s of a warm {n}-worker run by process kind (median of {len(warm)}):")
        for kind, seconds in sorted(medians.items(), key=lambda item: -item[1]):
            if seconds >= 0.05:
                print(f"  {kind:<40} {seconds:>7.2f}")
        print(f"  {'all':<40} {statistics.median(sum(cpu.values()) for cpu in warm):>7.2f}")


if __name__ == "__main__":
    main()
