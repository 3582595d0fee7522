"""The weights the losses take from the log-probs, in one place: LD-DPO's per-token weights (which the
policy and the reference must share, so they ride in the batch) and WPO's per-pair weights (from the
policy's own token probabilities)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ld_weights(completion_mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO token weights for a [2B, T] chosen+rejected batch, aligned with input_ids.

    Within a pair, the first min(len_chosen, len_rejected) scored tokens of each completion count
    fully; the longer completion's remaining ("verbose") tokens count ld_alpha times."""
    scored = completion_mask[:, 1:].float()
    position = scored.cumsum(1)
    chosen, rejected = scored.sum(1).chunk(2)
    shared = torch.minimum(chosen, rejected).repeat(2)
    tail = torch.full_like(scored, ld_alpha)
    weights = scored * torch.where(position <= shared[:, None], torch.ones_like(scored), tail)
    return F.pad(weights, (1, 0))  # position 0 is never scored


def wpo_weights(wpo: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """WPO (Eq. 2) per-pair weights [B] from the policy's [2B] chosen-first sums of log p_t - log sum_v p_v^2
    over completion tokens: exp of each side's mean over its tokens, chosen times rejected."""
    w_chosen, w_rejected = torch.exp(wpo / tokens.clamp(min=1)).chunk(2)
    return w_chosen * w_rejected
