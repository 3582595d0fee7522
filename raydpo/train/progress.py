"""The run's progress display: one line per logged step, printed by the process that called fit().

Rank 0 sends each logged dict to the run's MetricsHistory actor, as a ("log", metrics) event; a thread
here reads the new events every second and prints the logged ones. A line printed by a training worker would reach the driver through
Ray's log forwarding, prefixed with the worker's name and pid and interleaved with Ray's own lines;
read here, it is one plain line per step, with the time per step and the time left.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional

SHOWN = {"loss": "loss", "rewards/accuracies": "acc", "rewards/margins": "margin", "learning_rate": "lr",
         "eval_loss": "eval_loss", "eval_rewards/accuracies": "eval_acc"}


def progress_line(metrics: dict, total_steps: int, seconds_per_step: Optional[float] = None,
                  seconds_left: Optional[float] = None) -> str:
    """`[raydpo] step 5/30 epoch 0.17 | loss 0.6069 acc 0.75 ... | 3.9 s/step, eta 1m38s`."""
    values = " ".join(f"{label} {metrics[name]:.4g}" for name, label in SHOWN.items() if name in metrics)
    line = f"[raydpo] step {metrics['global_step']}/{total_steps} epoch {metrics['epoch']:.2f} | {values}"
    if seconds_per_step is not None:
        line += f" | {seconds_per_step:.2f} s/step, eta {_duration(seconds_left)}"
    return line


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(seconds)), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


class ProgressPrinter:
    """`with ProgressPrinter(fetch, total_steps): trainer.fit()` prints each logged step as it lands;
    `fetch(count)` returns the (kind, value) events after the first `count` (MetricsHistory.events_since).

    The rate is measured here, between the first and the latest logged step, so it covers everything a
    step costs (evaluation and checkpoints included), and start-up is not counted in it."""

    def __init__(self, fetch, total_steps: int, interval_s: float = 1.0, out=None):
        self.fetch, self.total_steps, self.interval_s = fetch, total_steps, interval_s
        self.out = out or sys.stdout
        self.seen = 0
        self.first: Optional[tuple] = None  # (time, step) of the first logged training step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydpo-progress", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._print_new()  # whatever landed after the last poll
        return False

    def _run(self):
        while not self._stop.wait(self.interval_s):
            self._print_new()

    def _print_new(self):
        try:
            events = self.fetch(self.seen)
        except Exception:  # the progress display must never fail a run; the history is read again at the end
            return
        self.seen += len(events)
        for metrics in (value for kind, value in events if kind == "log"):
            print(self.line(metrics, time.monotonic()), file=self.out, flush=True)

    def line(self, metrics: dict, now: float) -> str:
        step = metrics.get("global_step", 0)
        if self.first is None and step > 0:
            self.first = (now, step)
        rate = None
        if self.first is not None and step > self.first[1]:
            rate = (now - self.first[0]) / (step - self.first[1])
        left = rate * (self.total_steps - step) if rate is not None else None
        return progress_line(metrics, self.total_steps, rate, left)
