"""The driver's copy of a run's logged metrics: a small Ray actor that rank 0 sends each logged dict to.

It lives in a module of its own that imports neither torch nor the trainer: the actor's process
imports this module to create it, and a run should not pay torch's import for it."""

from __future__ import annotations

from typing import List

import ray

from raydpo.train.trackers import Trackers


@ray.remote(num_cpus=0)
class MetricsHistory:
    """Collects rank 0's logged metrics so the driver gets the whole history, on any cluster, and
    hands them to the trackers of `report_to` (TensorBoard by default; see trackers.py)."""

    def __init__(self, targets: List[str], run_dir: str, run_name: str, config: dict):
        self.rows = []
        self.trackers = Trackers(targets, run_dir, run_name, config)
        # For the driver's progress display (progress.py) and TrainerCallbacks (callbacks.py): ("log",
        # row), ("save", step) and ("end", step) in the order rank 0 sent them; the driver acks each ended step, with its should_training_stop.
        self.events = []
        self.acked, self.stop = -1.0, False
        self.marks = {}  # start-up phase -> wall time rank 0 reached it (raydpo.train.startup)

    def append(self, metrics: dict):
        # After a restart from a checkpoint, steps past it are logged again: the new ones replace them.
        step = metrics.get("global_step")
        if step is not None:
            self.rows = [row for row in self.rows if row.get("global_step", -1) < step]
        self.rows.append(dict(metrics))
        self.events.append(("log", dict(metrics)))
        self.trackers.log(metrics, metrics.get("global_step", len(self.rows)))

    def mark(self, marks: dict):
        for name, when in marks.items():
            self.marks.setdefault(name, when)  # the first attempt's; a restarted worker group reports again

    def startup_marks(self) -> dict:
        return dict(self.marks)

    def saved(self, step: int):
        self.events.append(("save", step))

    def end_step(self, step: int):
        self.events.append(("end", step))

    def events_since(self, index: int) -> list:
        return self.events[index:]

    def ack(self, step: float, stop: bool):
        self.acked, self.stop = max(self.acked, step), self.stop or stop

    def control(self, step: int):
        """None until the driver has delivered the events of `step`; then whether a callback asked to stop.
        (Polled: a threaded actor would move the trackers' calls off the thread that opened them.)"""
        return self.stop if self.acked >= step or self.stop else None

    def close(self) -> list:
        self.trackers.close()
        return self.rows
