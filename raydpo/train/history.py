"""The driver's copy of a run's logged metrics, kept by a small Ray actor that rank 0 sends each logged
dict to.

`RunHistory` is one run's. It lives in one of two actors (`open_history` picks):
- `SessionHistories`, one per driver (cluster.driver_actor), holds the history of every run the
  driver itself makes whose trackers keep no state per process (TensorBoard, or none: the default). A
  new actor per run would be a new process, ~1.3-1.9 CPU s of a warm 1-worker run's ~25 on the 2-core
  machine (bench/RESULTS.md); its calls are one run's in order, as an actor's are. The driver closes
  each run's history at the run's end, or discards it when the run fails.
- `MetricsHistory`, the run's own actor, otherwise:
  - for MLflow and W&B, each of which keeps its active run per process, and takes its settings from the
    process's environment (the driver's, handed on as `tracker_env`);
  - for a run made in a Ray process, such as a sweep's trial: Tune may end a trial's process without a
    word (ASHA stops it, or a forced stop), and a history held elsewhere would then stay open for the
    rest of the session, where the run's own actor ends with the process that owns it.

This module imports neither torch nor the trainer: the actors' processes import it, and a run should
not pay torch's import for them."""

from __future__ import annotations

import itertools
from typing import List

import ray

from raydpo.train.trackers import Trackers, tracker_env


class RunHistory:
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


# The trackers a SessionHistories actor can hold for many runs at once (see the module's docstring).
PER_PROCESS_TRACKERS = ("mlflow", "wandb")
NAME = "raydpo_run_histories"  # in the job's namespace: one per driver


@ray.remote(num_cpus=0)
class MetricsHistory(RunHistory):
    """A run's own history actor: for trackers that keep state per process (PER_PROCESS_TRACKERS), and for
    a run made in a Ray process (a sweep's trial); it ends with the process that owns it."""


@ray.remote(num_cpus=0)
class SessionHistories:
    """The RunHistory of each open run of the session, by key. A run's history ends with its `close`
    (or `discard`, when the run failed)."""

    def __init__(self):
        self.runs = {}

    def open(self, key: str, *args) -> None:
        self.runs[key] = RunHistory(*args)

    def call(self, key: str, method: str, *args):
        if key not in self.runs:
            raise KeyError(f"run history {key!r}: closed, discarded or never opened (asked for {method})")
        result = getattr(self.runs[key], method)(*args)
        if method == "close":
            del self.runs[key]
        return result

    def discard(self, key: str) -> None:
        run = self.runs.pop(key, None)
        if run is not None:
            run.close()  # its trackers; the rows go with it

    def open_runs(self) -> list:
        return sorted(self.runs)


class SharedHistory:
    """A run's RunHistory in the session's SessionHistories actor, called as a MetricsHistory actor's
    handle is (`history.append.remote(row)`); it pickles, so rank 0 gets it in its spec."""

    _keys = itertools.count()

    def __init__(self, actor, targets: List[str], run_dir: str, run_name: str, config: dict):
        self.actor, self.key = actor, f"{next(self._keys)}-{run_name}"  # only the driver opens them
        # Waited for: rank 0 calls from another process, and Ray orders an actor's calls per caller only.
        ray.get(actor.open.remote(self.key, targets, run_dir, run_name, config))

    def __getattr__(self, method: str):
        if method.startswith("_"):
            raise AttributeError(method)
        return _SharedMethod(self.actor, self.key, method)

    def discard(self) -> None:
        self.actor.discard.remote(self.key)


class _SharedMethod:
    def __init__(self, actor, key: str, method: str):
        self.actor, self.key, self.method = actor, key, method

    def remote(self, *args):
        return self.actor.call.remote(self.key, self.method, *args)


def session_histories():
    """The session's SessionHistories actor (cluster.driver_actor): made by the driver on first use."""
    from raydpo import cluster

    return cluster.driver_actor(SessionHistories, NAME)


def open_history(targets: List[str], run_dir: str, run_name: str, config: dict):
    """A new run's history, on the driver's node (anywhere else, the loss of that node would take the
    run's history with it, and no restart could log again): in the session's SessionHistories actor when
    the driver makes the run and no tracker keeps state per process; else in an actor of its own (see
    the module's docstring)."""
    from raydpo import cluster

    shared = session_histories() if cluster.in_driver() and not set(targets) & set(PER_PROCESS_TRACKERS) else None
    if shared is not None:
        return SharedHistory(shared, targets, run_dir, run_name, config)
    return MetricsHistory.options(runtime_env={"env_vars": tracker_env()},
                                  scheduling_strategy=cluster.on_this_node()).remote(targets, run_dir, run_name, config)


def discard_history(history) -> None:
    """After a failed run: a shared history's trackers closed and its rows dropped (a run's own actor ends
    once its handle is gone)."""
    if isinstance(history, SharedHistory):
        history.discard()
