"""DPO losses: pure tensor functions registered by name.

Each loss takes a `PairLogps` (per-pair summed log-probs of policy and reference) and the config,
and returns the per-pair loss [B]. The training loop never branches on a loss name: it looks the
name up in LOSSES and weights the results. Adding a loss is one function and one decorator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict

import torch
import torch.nn.functional as F

LOSSES: Dict[str, Callable] = {}


def register(name: str):
    def add(fn):
        LOSSES[name] = fn
        return fn

    return add


@dataclass
class PairLogps:
    """Summed completion log-probs per pair, shape [B] each."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        """The DPO logit: (policy chosen-rejected) - (reference chosen-rejected)."""
        return (self.chosen - self.rejected) - (self.ref_chosen - self.ref_rejected)


@register("sigmoid")
def sigmoid_loss(logps: PairLogps, beta: float, **_) -> torch.Tensor:
    """Original DPO (Rafailov et al. 2023). As in TRL 1.16, label_smoothing does not enter it."""
    return -F.logsigmoid(beta * logps.logits)


def dpo_loss(logps: PairLogps, loss_types, loss_weights, beta: float, label_smoothing: float) -> torch.Tensor:
    """Weighted sum of the registered losses, averaged over the pairs of the batch."""
    total = 0.0
    for name, weight in zip(loss_types, loss_weights):
        total = total + weight * LOSSES[name](logps, beta=beta, label_smoothing=label_smoothing).mean()
    return total


def rewards(logps: PairLogps, beta: float):
    """Implicit rewards beta * log(pi/pi_ref) for chosen and rejected, detached."""
    chosen = beta * (logps.chosen - logps.ref_chosen).detach()
    rejected = beta * (logps.rejected - logps.ref_rejected).detach()
    return chosen, rejected
