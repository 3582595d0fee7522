"""When the loop logs, evaluates, saves and stops: pure decisions from the step and the config.

Every worker makes the same decisions from the same (all-reduced) numbers, so they stay in lock-step
without extra messages.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

from raydpo.config import DPOConfig


def steps_of(value, total_steps: int) -> int:
    """A step count, or a ratio in (0, 1) of the total steps (transformers' TrainerState.compute_steps)."""
    return math.ceil(total_steps * value) if value < 1 else int(value)


def warmup_steps(config: DPOConfig, total_steps: int) -> int:
    """transformers' TrainingArguments.get_warmup_steps: a float >= 1 is truncated, a ratio rounds up;
    raydpo's warmup_ratio applies when warmup_steps is 0."""
    if config.warmup_steps > 0:
        return int(config.warmup_steps) if config.warmup_steps >= 1 else math.ceil(total_steps * config.warmup_steps)
    return math.ceil(config.warmup_ratio * total_steps)


def resolve_ratios(config: DPOConfig, total_steps: int) -> DPOConfig:
    """The config with logging, eval and save intervals given as ratios turned into step counts. A copy,
    not dataclasses.replace: two ratios that pass the save/eval multiple check (as in transformers) may
    round to counts that do not, and the construction-time checks must not fail inside a worker."""
    resolved = copy.copy(config)
    for name in ("logging_steps", "save_steps", "eval_steps"):
        if getattr(config, name) is not None:
            setattr(resolved, name, steps_of(getattr(config, name), total_steps))
    return resolved


def log_due(step: int, config: DPOConfig, last: bool) -> bool:
    return step % config.logging_steps == 0 or last or (step == 1 and config.logging_first_step)


def eval_due(step: int, config: DPOConfig, steps_per_epoch: int, last: bool) -> bool:
    """Evaluate now? Only called when there is an eval set; its final model is always evaluated."""
    if config.eval_strategy == "steps":
        return step % config.eval_interval == 0 or last
    if config.eval_strategy == "epoch":
        return step % steps_per_epoch == 0 or last
    return last


def save_due(step: int, config: DPOConfig, steps_per_epoch: int, last: bool, evaluated: bool,
             new_best: bool = False) -> bool:
    """Save now? new_best: this step's evaluation beat the best eval metric so far."""
    if config.save_strategy == "no":
        return False
    if last:  # save_model and push_to_hub export the last (or best) checkpoint
        return True
    if config.save_strategy == "best":
        return new_best
    # load_best_model_at_end ranks checkpoints by an eval metric: each evaluation gets one.
    if evaluated and config.load_best_model_at_end:
        return True
    return step % (config.save_steps if config.save_strategy == "steps" else steps_per_epoch) == 0


class EarlyStopping:
    """transformers' EarlyStoppingCallback rule: stop after `patience` evaluations in a row that did not
    beat the best value so far by more than `threshold`. Its state rides in checkpoints."""

    def __init__(self, config: DPOConfig, state: Optional[dict] = None):
        self.metric, mode = config.best_metric
        self.greater = mode == "max"
        self.patience, self.threshold = config.early_stopping_patience, config.early_stopping_threshold
        state = state or {}
        self.best: Optional[float] = state.get("best_metric")
        self.evals_without_improvement: int = state.get("evals_without_improvement", 0)
        self.new_best = False  # the last evaluation beat the best so far (save_strategy="best")

    def update(self, metrics: dict) -> bool:
        """Record one evaluation; True when training should stop."""
        value = metrics[self.metric]
        better = self.best is None or (value > self.best if self.greater else value < self.best)
        # as transformers: the counter resets only on a gain above the threshold; any gain is the new best
        improved = better and (self.best is None or abs(value - self.best) > self.threshold)
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        self.new_best = better and math.isfinite(value)
        if self.new_best:
            self.best = value
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def state(self) -> dict:
        return {"best_metric": self.best, "evals_without_improvement": self.evals_without_improvement}
