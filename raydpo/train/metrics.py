"""Training metrics averaged over a logging window and over all workers, the way TRL logs them."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")


def pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> dict:
    """Per-pair values [B] for one micro-batch (detached)."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),  # ties count as wrong, as in TRL
        "logps/chosen": chosen_logps.detach(),
        "logps/rejected": rejected_logps.detach(),
    }


class MetricsWindow:
    """Sums since the last log; `reduce` averages them over the window and all workers.

    Every worker runs the same number of equally sized micro-batches, so the mean over all pairs
    equals TRL's mean over micro-batches of the mean gathered across processes.
    """

    def __init__(self):
        self.total_tokens = 0.0
        self._reset()

    def _reset(self):
        self.sums = defaultdict(float)
        self.pairs = 0
        self.micro_batches = 0
        self.tokens = 0.0

    def add(self, loss: torch.Tensor, per_pair: dict, tokens: int):
        self.micro_batches += 1
        self.sums["loss"] += float(loss.detach())
        for name, values in per_pair.items():
            self.sums[name] += float(values.sum())
        self.pairs += len(next(iter(per_pair.values())))
        self.tokens += tokens

    def reduce(self) -> dict:
        names = ["loss", *PAIR_METRICS]
        values = torch.tensor([self.sums[n] for n in names] + [self.pairs, self.micro_batches, self.tokens],
                              dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        *sums, pairs, micro_batches, tokens = values.tolist()
        self.total_tokens += tokens
        out = {"loss": sums[0] / max(micro_batches, 1)}
        out.update({name: total / max(pairs, 1) for name, total in zip(PAIR_METRICS, sums[1:])})
        out["num_tokens"] = self.total_tokens
        self._reset()
        return out
