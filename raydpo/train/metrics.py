"""Training metrics averaged over a logging window and over all workers, the way TRL 1.16 logs them.

TRL appends one value per micro-batch and logs the plain mean of those values. A pair metric's
value is the mean over the pairs of all workers. A token metric's value is a ratio whose numerator
and denominator are both summed over all workers first (token-weighted across workers), so the
window keeps one (sum, count) row per micro-batch and divides after the all-reduce.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected")
TOKEN_METRICS = ("entropy", "mean_token_accuracy", "logits/chosen", "logits/rejected")
# Logged only when the model has them: an MoE model's load-balancing loss, a (value, 1) row per micro-batch,
# so the window logs TRL's mean over micro-batches of the mean over workers.
OPTIONAL_METRICS = ("aux_loss",)


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


def token_metrics(policy) -> dict:
    """(sum, count) per token metric for one micro-batch, from the policy's `CompletionStats` [2B].

    entropy covers chosen and rejected completion tokens; token accuracy only chosen ones. An MoE
    policy's aux_loss (with router_aux_loss_coef) is one (value, 1) row."""
    half = policy.tokens.shape[0] // 2
    tokens_chosen, tokens_rejected = policy.tokens[:half].sum(), policy.tokens[half:].sum()
    metrics = {
        "entropy": (policy.entropy.sum(), policy.tokens.sum()),
        "mean_token_accuracy": (policy.correct[:half].sum(), tokens_chosen),
        "logits/chosen": (policy.mean_logits[:half].sum(), tokens_chosen),
        "logits/rejected": (policy.mean_logits[half:].sum(), tokens_rejected),
    }
    if policy.aux_loss is not None:
        metrics["aux_loss"] = (policy.aux_loss.detach().reshape(()), torch.ones((), device=policy.aux_loss.device))
    return metrics


class MetricsWindow:
    """Sums since the last log; `reduce` averages them over the window and all workers.

    Every worker runs the same number of equally sized micro-batches, so the mean over all pairs
    equals TRL's mean over micro-batches of the mean gathered across processes, and the per-micro-
    batch token rows line up across workers.
    """

    def __init__(self):
        self.total_tokens = 0.0
        self.device = torch.device("cpu")
        self.ratio_names = TOKEN_METRICS  # and the OPTIONAL_METRICS the model has, from the first micro-batch
        self.window_flops = 0.0
        self.window_hardware_flops = 0.0
        self._reset()

    def _reset(self):
        self.sums = defaultdict(float)
        self.token_rows = []  # per micro-batch: [sum, count] for each of TOKEN_METRICS
        self.pairs = 0
        self.micro_batches = 0
        self.tokens = 0.0
        self.positions = 0.0  # batch positions, and those holding a token: for padding_fraction
        self.filled = 0.0
        self.flops = 0.0  # model FLOPs (raydpo/flops.py), when the loop counts them: for mfu
        self.hardware_flops = 0.0  # and the FLOPs the batches ran: for hfu

    def add(self, loss: torch.Tensor, per_pair: dict, per_token: dict, counts: tuple, flops: tuple = (0.0, 0.0),
            continues: bool = False):
        """counts: (tokens, filled positions, positions) of the batch (`batching.token_counts`);
        flops: (model, hardware) FLOPs of the batch (raydpo/flops.py). continues: the batch is a later piece
        of the micro-batch added last (padding_free_max_tokens), whose loss is already weighted by its share
        of the pairs: its loss and token counts add to that micro-batch's, as if it had run whole."""
        tokens, filled, positions = counts
        self.flops += flops[0]
        self.hardware_flops += flops[1]
        self.micro_batches += 0 if continues else 1
        self.positions += positions
        self.filled += filled
        self.device = loss.device  # NCCL all-reduces only device tensors
        self.pairs += len(per_pair["rewards/chosen"])
        self.ratio_names = TOKEN_METRICS + tuple(name for name in OPTIONAL_METRICS if name in per_token)
        # One device-to-host copy per micro-batch.
        values = torch.stack([loss.detach().float().reshape(())]
                             + [per_pair[name].float().sum() for name in PAIR_METRICS]
                             + [v.float() for name in self.ratio_names for v in per_token[name]]).tolist()
        self.sums["loss"] += values[0]
        for name, value in zip(PAIR_METRICS, values[1:]):
            self.sums[name] += value
        token_row = values[1 + len(PAIR_METRICS):]
        if continues:  # ratios are per micro-batch: numerators and denominators add up first
            self.token_rows[-1] = [a + b for a, b in zip(self.token_rows[-1], token_row)]
        else:
            self.token_rows.append(token_row)
        self.tokens += tokens

    def add_padding(self):
        """A forward that counts for nothing (an eval worker with fewer rows than the others): it keeps
        the per-micro-batch token rows lined up across workers."""
        self.token_rows.append([0.0] * 2 * len(self.ratio_names))

    def reduce(self) -> dict:
        flat = [self.sums[n] for n in ("loss", *PAIR_METRICS)] + [self.pairs, self.micro_batches, self.tokens,
                                                                  self.filled, self.positions, self.flops,
                                                                  self.hardware_flops]
        names = self.ratio_names  # the same on every worker: they train the same model
        rows = torch.tensor(self.token_rows, dtype=torch.float64).reshape(-1, 2 * len(names))
        values = torch.cat([torch.tensor(flat, dtype=torch.float64), rows.flatten()])
        if dist.is_available() and dist.is_initialized():
            values = values.to(self.device)
            dist.all_reduce(values)
            values = values.cpu()
        *sums, pairs, micro_batches, tokens, filled, positions, flops, hardware_flops = values[:len(flat)].tolist()
        rows = values[len(flat):].reshape(-1, len(names), 2)
        self.total_tokens += tokens
        out = {"loss": sums[0] / max(micro_batches, 1)}
        out.update({name: total / max(pairs, 1) for name, total in zip(PAIR_METRICS, sums[1:])})
        # Per micro-batch ratio over all workers (0 without tokens, as TRL), then the window mean.
        ratios = torch.where(rows[..., 1] > 0, rows[..., 0] / rows[..., 1].clamp(min=1), torch.zeros(()))
        means = ratios.mean(0).tolist() if len(ratios) else [0.0] * len(names)
        out.update(zip(names, means))
        out["num_tokens"] = self.total_tokens
        out["padding_fraction"] = 1.0 - filled / positions if positions else 0.0  # a raydpo extra
        self.window_flops = flops  # all workers' model FLOPs of this window (the loop's mfu)
        self.window_hardware_flops = hardware_flops  # and hardware FLOPs (its hfu)
        self._reset()
        return out
