"""Where a run's start-up time goes: from fit() to the end of the first optimizer step, by phase.

Rank 0 notes the wall time at which it reaches each phase's end (`StartupClock.mark`) and sends them
all to the run's MetricsHistory after the first optimizer step; the driver adds its own start and
turns the marks into seconds per phase (`startup_seconds`), kept as TrainOutput.startup. bench/startup.py
prints them. Wall times of different processes are compared, so on a multi-node cluster the phases
that cross machines carry the nodes' clock skew.
"""

from __future__ import annotations

import os
import time
from typing import Dict, Optional

# (mark, phase that ends there), in the order a run reaches them. "fit_start" is the driver's.
PHASES = [
    ("worker_process_start", "worker group"),  # controller, placement group and worker processes started
    ("loop_start", "imports and process group"),  # the loop's modules imported, torch.distributed joined
    ("data", "data shard"),  # this worker's shard read
    ("model", "model load"),  # the policy loaded (and wrapped by PEFT)
    ("deepspeed", "deepspeed init"),  # DeepSpeed's engine and optimizer built
    ("reference", "reference"),  # the reference built (a second model for the in-worker mode), resume read
    ("first_step", "first step"),  # the first optimizer step done (its micro-batches, backward and step)
]


class StartupClock:
    """Rank 0's phase marks; other ranks note nothing. `send(history)` ships them once."""

    def __init__(self, rank: int, new_process: bool = True):
        """`new_process`: this process was started for the run (a Ray Train worker), so its start time
        marks the end of the worker-group phase; local mode runs in the driver, which has none."""
        self.marks: Optional[Dict[str, float]] = None
        if rank == 0:
            self.marks = {"loop_start": time.time()}
            if not new_process:
                return
            try:
                import psutil

                self.marks["worker_process_start"] = psutil.Process(os.getpid()).create_time()
            except ImportError:  # Ray depends on psutil; without it the worker-group phase folds into the next
                pass

    def mark(self, name: str) -> None:
        if self.marks is not None and name not in self.marks:
            self.marks[name] = time.time()

    def send(self, history) -> None:
        if self.marks is not None and "first_step" in self.marks:
            history.mark.remote(self.marks)  # not awaited: the run does not wait for the driver's bookkeeping
            self.marks = None


def startup_seconds(fit_start: float, marks: Dict[str, float]) -> Dict[str, float]:
    """Seconds spent in each phase reached, in order, plus "total" (fit() to the first step's end).
    A phase whose end was not marked folds into the next one."""
    seconds, previous = {}, fit_start
    for mark, phase in PHASES:
        if mark in marks:
            seconds[phase] = round(max(0.0, marks[mark] - previous), 3)
            previous = marks[mark]
    if seconds:
        seconds["total"] = round(previous - fit_start, 3)
    return seconds
