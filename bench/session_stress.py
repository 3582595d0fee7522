"""Many runs in one Ray session on a busy machine: a hunt for the one-session stall (issue 15).

    .venv/bin/python bench/session_stress.py [--minutes 25] [--hogs 1] [--deadline 300]

One driver, one embedded Ray session, short `DPOTrainer(...).train()` calls of several kinds back to back
(1 and 2 workers, ZeRO 0/2/3, precomputed and streamed reference, an eval split, PEFT), for `--minutes`,
while `--hogs` processes spin on the CPU beside them: the once-seen stall came in a long session on a
busy 2-core machine, where Ray's own processes answered slowly (docs/clusters.md, "Many runs in one
session"). After each run it checks that the run gave back its placement group and CPUs
(`cluster.leftovers`).

A run still going after `--deadline` seconds counts as stalled: the script prints every driver thread's
stack, the session's live actors and placement groups and the free CPUs, and names the session's log
folder (the GCS and raylet logs stay there), then stops the session and exits with status 2.
Otherwise it prints one line per run (kind, seconds, to step 1) and a summary, and exits 0.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REFERENCE_POOL = dict(precompute_ref_batch_size=4, precompute_ref_num_actors=1, precompute_ref_cache_dir=None)
KINDS = [  # (name, DPOConfig overrides)
    ("1 worker, ZeRO-0", dict(num_workers=1, zero_stage=0)),
    ("2 workers, ZeRO-2, eval", dict(num_workers=2, zero_stage=2, eval_strategy="steps", eval_steps=2)),
    ("2 workers, ZeRO-3, precomputed", dict(num_workers=2, zero_stage=3, precompute_ref_log_probs=True,
                                            **REFERENCE_POOL)),
    ("1 worker, streamed", dict(num_workers=1, stream_ref_log_probs=True, **REFERENCE_POOL)),
    ("2 workers, ZeRO-0, PEFT", dict(num_workers=2, zero_stage=0, peft=True)),
]
HOG = "while True: pass"
hogs: list = []  # the busy processes, stopped on every way out


def one_run(model: str, rows: list, overrides: dict, output_dir: str) -> dict:
    from raydpo import DPOConfig, DPOTrainer

    overrides = dict(overrides)
    peft_config = None
    if overrides.pop("peft", False):
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    config = DPOConfig(output_dir=output_dir, max_steps=2, logging_steps=1, save_strategy="no", report_to="none",
                       per_device_train_batch_size=4, max_length=32, learning_rate=1e-3, **overrides)
    eval_rows = rows[:8] if config.eval_strategy != "no" else None
    started = time.perf_counter()
    out = DPOTrainer(model, args=config, train_dataset=rows, eval_dataset=eval_rows, peft_config=peft_config).train()
    return {"seconds": time.perf_counter() - started, "to step 1": out.startup.get("total", float("nan"))}


def stop_hogs() -> None:
    for hog in hogs:
        hog.kill()


def report_stall(kind: str, deadline: float) -> None:
    """Called by the watchdog: print what the session holds and where the driver waits, then exit 2."""
    import ray

    from raydpo import cluster

    print(f"\nSTALL: '{kind}' still running after {deadline:.0f} s", flush=True)
    faulthandler.dump_traceback(all_threads=True)
    try:
        print("available resources:", ray.available_resources(), flush=True)
        groups = {pg: info["state"] for pg, info in ray.util.placement_group_table().items()
                  if info["state"] != "REMOVED"}
        print("placement groups not removed:", groups, flush=True)
        for actor in cluster.session_actors([("state", "!=", "DEAD")]):
            print(f"  actor {actor.class_name} {actor.state} pid={actor.pid} {actor.required_resources}", flush=True)
        print("session logs:", ray._private.worker.global_worker.node.get_logs_dir_path(), flush=True)
    finally:
        stop_hogs()
        ray.shutdown()  # the session's processes stop; its logs stay
        os._exit(2)  # the main thread is the one waiting


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=25.0, help="keep starting runs for this long")
    parser.add_argument("--hogs", type=int, default=1, help="busy-loop processes beside the runs")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds after which a run counts as stalled")
    args = parser.parse_args()

    from raydpo import cluster
    from raydpo.models import build_tiny_model
    from raydpo.tasks import parity_pairs

    rows = parity_pairs(40, seed=1)
    hogs.extend(subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.hogs))
    results = []
    try:
        with tempfile.TemporaryDirectory() as work:
            model = build_tiny_model(os.path.join(work, "model"), [r["prompt"] + r["chosen"] + r["rejected"] for r in rows])
            cluster.connect("local")
            end = time.monotonic() + 60 * args.minutes
            i = 0
            while time.monotonic() < end:
                kind, overrides = KINDS[i % len(KINDS)]
                watchdog = threading.Timer(args.deadline, report_stall, args=(kind, args.deadline))
                watchdog.daemon = True
                watchdog.start()
                result = one_run(model, rows, overrides, os.path.join(work, f"run{i}"))
                watchdog.cancel()
                left = cluster.leftovers()
                held = bool(left["placement_groups"] or left["cpus_in_use"])
                results.append((kind, result))
                print(f"{i:>4}  {kind:<32} {result['seconds']:7.1f} s  to step 1 {result['to step 1']:6.1f} s  "
                      f"leftovers {left if held else 'none'}", flush=True)
                if held:
                    print("a run left resources behind: a later run would wait for them", flush=True)
                    return 1
                i += 1
    finally:
        stop_hogs()
    print(f"{len(results)} runs in one session, {args.hogs} busy process(es) beside them: every run finished")
    for kind, _ in KINDS:
        seconds = [r["seconds"] for k, r in results if k == kind]
        if seconds:
            print(f"  {kind:<32} {len(seconds):>3} runs, median {statistics.median(seconds):6.1f} s, "
                  f"max {max(seconds):6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
