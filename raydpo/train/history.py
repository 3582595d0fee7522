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
        self.logged = []  # every dict in the order it arrived, re-logged steps included: the progress display reads it
        self.trackers = Trackers(targets, run_dir, run_name, config)

    def append(self, metrics: dict):
        # After a restart from a checkpoint, steps past it are logged again: the new ones replace them.
        step = metrics.get("global_step")
        if step is not None:
            self.rows = [row for row in self.rows if row.get("global_step", -1) < step]
        self.rows.append(dict(metrics))
        self.logged.append(dict(metrics))
        self.trackers.log(metrics, metrics.get("global_step", len(self.rows)))

    def logged_since(self, count: int) -> list:
        """The dicts logged after the first `count`."""
        return self.logged[count:]

    def close(self) -> list:
        self.trackers.close()
        return self.rows
