"""transformers `TrainerCallback`s on the driver: `DPOTrainer(..., callbacks=[...])`.

The workers run the loop; rank 0 sends each logged row and each saved checkpoint to the run's
MetricsHistory actor (history.py) as an event, in order. While Ray Train runs, a thread of the driver
(progress.EventPump) polls the actor and delivers each event at once (live, not replayed at the end):

- a logged row: `on_log(logs=<training metrics>)`, and when the row holds an evaluation,
  `on_log(logs=<eval_ metrics>)` then `on_evaluate(metrics=<eval_ metrics>)`, as transformers' Trainer
  logs and evaluates (two log_history entries);
- a checkpoint: `on_save`, with `state.best_model_checkpoint` set when it is the best one so far;
- `on_train_begin` before the workers start and `on_train_end` after they finish, on the caller's thread.

Each callback gets (args, state, control, processing_class=..., plus logs / metrics), where args is
the DPOConfig, state a `transformers.TrainerState` (global_step, epoch, max_steps, log_history,
best_metric, best_global_step, best_model_checkpoint) and control a `transformers.TrainerControl`;
a callback that returns a TrainerControl replaces it, as in transformers.

`control.should_training_stop = True` is honoured: at every step that logs or saves, all workers
wait until the driver has delivered that step's events, then ask whether a callback set it, and
stop together after that step (saving it first, unless it was saved already, so save_model has the
final weights). The other control flags (should_log, should_evaluate, should_save) are not read:
DPOConfig's schedule decides those.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

from raydpo import storage
from raydpo.config import DPOConfig
from raydpo.train.schedule import resolve_ratios
from raydpo.train.spec import TrainingPlan

EVENTS = ("on_train_begin", "on_log", "on_evaluate", "on_save", "on_train_end")


class CallbackHandler:
    """Turns the workers' events into TrainerCallback calls and keeps the TrainerState.

    on_save_hook(step, checkpoint_path, last_logs) runs at each saved checkpoint before the callbacks
    (push_to_hub with hub_strategy="every_save")."""

    def __init__(self, callbacks, args: DPOConfig, processing_class=None, on_save_hook: Optional[Callable] = None):
        from transformers import TrainerControl, TrainerState

        self.callbacks = [callback() if isinstance(callback, type) else callback for callback in callbacks or ()]
        for callback in self.callbacks:
            if not any(callable(getattr(callback, event, None)) for event in EVENTS):
                raise TypeError(f"callback {callback!r} has none of the methods {list(EVENTS)}: pass "
                                "transformers.TrainerCallback instances (or classes)")
        self.args, self.processing_class, self.on_save_hook = args, processing_class, on_save_hook
        self.state, self.control = TrainerState(), TrainerControl()
        self.metric, mode = args.best_metric
        self.greater = mode == "max"
        self.last_logs: dict = {}

    @property
    def waits(self) -> bool:
        """Do the workers wait for the driver at each logged or saved step (to honour should_training_stop)?"""
        return bool(self.callbacks)

    def call(self, event: str, **kwargs):
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is not None:
                result = method(self.args, self.state, self.control, processing_class=self.processing_class, **kwargs)
                if result is not None:
                    self.control = result

    def train_begin(self, plan: TrainingPlan, run_dir: str):
        from transformers import TrainerControl, TrainerState

        total, per_epoch = plan.total_steps, plan.steps_per_epoch
        resolved = resolve_ratios(self.args, total)
        self.run_dir = run_dir
        self.state = TrainerState(max_steps=total, logging_steps=resolved.logging_steps,
                                  eval_steps=resolved.eval_interval, save_steps=resolved.save_steps,
                                  train_batch_size=self.args.per_device_train_batch_size,
                                  num_train_epochs=math.ceil(total / per_epoch), epoch=0.0, global_step=0)
        self.control = TrainerControl()
        self.call("on_train_begin")

    def handle(self, event: tuple):
        """One event from the history actor: ("log", row), ("save", step) or ("end", step)."""
        kind = event[0]
        if kind == "log":
            row = event[1]
            step, epoch = row.get("global_step", self.state.global_step), row.get("epoch", self.state.epoch)
            self.state.global_step, self.state.epoch = step, epoch
            train = {k: v for k, v in row.items() if not k.startswith("eval_") and k not in ("global_step", "epoch")}
            evals = {k: v for k, v in row.items() if k.startswith("eval_")}
            if train:
                self._log({**train, "epoch": epoch})
            if evals:
                self._best(evals, step)
                logs = {**evals, "epoch": epoch}
                self._log(logs)
                self.call("on_evaluate", metrics=logs)
        elif kind == "save":
            step = event[1]
            path = storage.join(self.run_dir, f"checkpoint-{step}")  # a URI keeps its query
            self.state.global_step = step
            if self.state.best_global_step == step:
                self.state.best_model_checkpoint = path
            if self.on_save_hook is not None:
                self.on_save_hook(step, path, dict(self.last_logs))
            self.call("on_save")

    def _log(self, logs: dict):
        self.last_logs.update(logs)
        self.state.log_history.append({**logs, "step": self.state.global_step})
        self.call("on_log", logs=logs)

    def _best(self, evals: dict, step: int):
        value = evals.get(self.metric)
        if value is None or not math.isfinite(value):
            return
        best = self.state.best_metric
        if best is None or (value > best if self.greater else value < best):
            self.state.best_metric, self.state.best_global_step = value, step

    def train_end(self):
        self.call("on_train_end")
