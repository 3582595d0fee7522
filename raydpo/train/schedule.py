"""When the loop logs, evaluates, saves and stops: pure decisions from the step and the config.

Every worker makes the same decisions from the same (all-reduced) numbers, so they stay in lock-step
without extra messages.
"""

from __future__ import annotations

import math
from typing import Optional

from raydpo.config import DPOConfig


def log_due(step: int, config: DPOConfig, last: bool) -> bool:
    return step % config.logging_steps == 0 or last


def eval_due(step: int, config: DPOConfig, steps_per_epoch: int, last: bool) -> bool:
    """Evaluate now? Only called when there is an eval set; its final model is always evaluated."""
    if config.eval_strategy == "steps":
        return step % config.eval_interval == 0 or last
    if config.eval_strategy == "epoch":
        return step % steps_per_epoch == 0 or last
    return last


def save_due(step: int, config: DPOConfig, last: bool, evaluated: bool) -> bool:
    # load_best_model_at_end ranks checkpoints by an eval metric: each evaluation gets one.
    return step % config.save_steps == 0 or last or (evaluated and config.load_best_model_at_end)


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

    def update(self, metrics: dict) -> bool:
        """Record one evaluation; True when training should stop."""
        value = metrics[self.metric]
        better = self.best is None or (value > self.best if self.greater else value < self.best)
        # as transformers: the counter resets only on a gain above the threshold; any gain is the new best
        improved = better and (self.best is None or abs(value - self.best) > self.threshold)
        self.evals_without_improvement = 0 if improved else self.evals_without_improvement + 1
        if better and math.isfinite(value):
            self.best = value
        return self.patience is not None and self.evals_without_improvement >= self.patience

    def state(self) -> dict:
        return {"best_metric": self.best, "evals_without_improvement": self.evals_without_improvement}
