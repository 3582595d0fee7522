"""Following a run from the process that called fit(): one line per logged step, and the events that
drive transformers TrainerCallbacks (callbacks.py).

Rank 0 sends each logged dict to the run's MetricsHistory actor, as a ("log", metrics) event, and each
saved checkpoint and finished step as events too; one thread here (EventPump) reads the new events and
prints the logged ones, and hands every event to the callbacks' handler when there are callbacks.
A line printed by a training worker would reach the driver through Ray's log forwarding, prefixed
with the worker's name and pid and interleaved with Ray's own lines; read here, it is one plain line
per step, with the time per step and the time left.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, Optional

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
    """Prints each logged step as one line (progress_line), with the rate measured here, between the first
    and the latest logged step: it covers everything a step costs (evaluation and checkpoints included),
    and start-up is not counted in it."""

    def __init__(self, total_steps: int, out=None):
        self.total_steps, self.out = total_steps, out or sys.stdout
        self.first: Optional[tuple] = None  # (time, step) of the first logged training step

    def show(self, metrics: dict) -> None:
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


class EventPump:
    """`with EventPump(fetch, printer, handler, ack): trainer.fit()`: the one driver thread that follows
    the run's events while Ray Train runs. `fetch(count)` returns the (kind, value) events after the first
    `count` (MetricsHistory.events_since). Each logged row goes to the printer; with TrainerCallbacks, every
    event also goes to their `handler` (callbacks.CallbackHandler), and each finished step is acked with
    `ack(step, should_training_stop)` (MetricsHistory.ack) so that the workers waiting on it go on.

    The display never fails a run: without a handler, a failed fetch is skipped (the history is read
    again at the end). A callback's error, or a failed fetch the callbacks would miss events by, stops
    the workers (an ack of every step with stop) and is raised when the block ends."""

    def __init__(self, fetch: Callable[[int], list], printer: ProgressPrinter, handler=None,
                 ack: Optional[Callable[[float, bool], None]] = None, interval_s: float = 1.0):
        self.fetch, self.printer, self.handler, self.ack = fetch, printer, handler, ack
        self.interval_s, self.seen, self.errors = interval_s, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="raydpo-events", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        """After Ray Train returned: deliver what is left, then raise a callback's error."""
        self._stop.set()
        self._thread.join()
        if self.errors:
            raise self.errors[0]
        return False

    def _run(self):
        try:
            while True:
                finished = self._stop.is_set()  # read before the fetch: that fetch still gets the last events
                events = self._fetch()
                for event in events:
                    self._deliver(event)
                if finished and not events:
                    return
                if not events:
                    self._stop.wait(self.interval_s)
        except BaseException as error:  # a callback failed: stop the workers, raise it after the run
            self.errors.append(error)
            self.ack(float("inf"), True)

    def _fetch(self) -> list:
        try:
            events = self.fetch(self.seen)
        except Exception:
            if self.handler is not None:
                raise
            return []
        self.seen += len(events)
        return events

    def _deliver(self, event: tuple) -> None:
        kind, value = event
        if kind == "log":
            self.printer.show(value)
        if self.handler is not None:
            self.handler.handle(event)
            if kind == "end":
                self.ack(value, bool(self.handler.control.should_training_stop))
