"""DPO losses: pure tensor functions registered by name, computed as TRL 1.16 computes them.

Each loss takes a `PairLogps` and the run's settings (`args`: beta, label_smoothing, discopop_tau,
f_divergence_type, f_alpha_divergence_coef; a DPOConfig) and returns the per-pair loss [B]. The
training loop never branches on a loss name: `dpo_loss` looks each name up in LOSSES and weights
the results. Adding a loss is one function and one decorator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

LOSSES: Dict[str, Callable] = {}
# Losses built on the chosen-rejected score difference: the only ones with an f-divergence form
# (f-DPO's log Z(x) term cancels only in that difference).
F_DIVERGENCE_LOSSES = set()
# Losses that sort the batch, so per-pair (WPO) weights would no longer line up with the pairs.
SORTING_LOSSES = set()
# Losses that average over the micro-batch's chosen tokens rather than over its pairs: a piece of a
# micro-batch (padding_free_max_tokens) weights them by its share of those tokens (`PieceShare`).
TOKEN_MEAN_LOSSES = set()
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def register(name: str, f_divergence: bool = False, sorts_pairs: bool = False, token_mean: bool = False):
    def add(fn):
        LOSSES[name] = fn
        if f_divergence:
            F_DIVERGENCE_LOSSES.add(name)
        if sorts_pairs:
            SORTING_LOSSES.add(name)
        if token_mean:
            TOKEN_MEAN_LOSSES.add(name)
        return fn

    return add


@dataclass
class PairLogps:
    """What the losses see, per pair, shape [B] each.

    chosen/rejected are sequence log-probs summed over completion tokens (LD-DPO-weighted when
    ld_alpha is set); the optional fields are filled by `logprobs.pair_logps` for the losses that
    need them.
    """

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_tokens: Optional[torch.Tensor] = None  # completion length (ipo, sigmoid_norm)
    rejected_tokens: Optional[torch.Tensor] = None
    sft_logps: Optional[torch.Tensor] = None  # unweighted summed chosen log-probs (sft)
    sft_tokens: Optional[torch.Tensor] = None  # scored chosen tokens (sft)
    weights: Optional[torch.Tensor] = None  # per-pair loss weights (WPO), detached

    @property
    def chosen_logratios(self) -> torch.Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> torch.Tensor:
        return self.rejected - self.ref_rejected


def f_score(logratios: torch.Tensor, args) -> torch.Tensor:
    """f'(pi/pi_ref) of the f-divergence (f-DPO); reverse KL gives the plain log-ratio."""
    kind, alpha = args.f_divergence_type, args.f_alpha_divergence_coef
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(alpha - 1.0) < 1e-6):  # alpha -> 1: reverse KL
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t / (t + 1))
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":  # f'(t) = (t^(alpha-1) - 1) / (alpha - 1)
        # The exponent is clamped so exp() stays finite once cast back to a half-precision dtype.
        clamp = 11.0 if logratios.dtype == torch.float16 else 80.0
        t = ((alpha - 1.0) * logratios).float().clamp(max=clamp)
        return (torch.exp(t) - 1.0).to(logratios.dtype) * (1.0 / (alpha - 1.0))
    raise ValueError(f"unknown f_divergence_type {kind!r}; valid: {F_DIVERGENCES}")


def _scores(x: PairLogps, args):
    return f_score(x.chosen_logratios, args), f_score(x.rejected_logratios, args)


def _delta(x: PairLogps, args) -> torch.Tensor:
    chosen, rejected = _scores(x, args)
    return chosen - rejected


def _length_normalized_delta(x: PairLogps, args) -> torch.Tensor:
    chosen, rejected = _scores(x, args)
    return chosen / x.chosen_tokens.clamp(min=1.0) - rejected / x.rejected_tokens.clamp(min=1.0)


def _smoothed_sigmoid(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """cDPO: the sigmoid loss with preference labels flipped with probability eps."""
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


@register("sigmoid", f_divergence=True)
def sigmoid(x: PairLogps, args) -> torch.Tensor:
    """DPO (Rafailov et al. 2023). As in TRL 1.16, label_smoothing does not enter it."""
    return -F.logsigmoid(args.beta * _delta(x, args))


@register("hinge", f_divergence=True)
def hinge(x: PairLogps, args) -> torch.Tensor:
    """SLiC (Zhao et al. 2023)."""
    return torch.relu(1 - args.beta * _delta(x, args))


@register("ipo", f_divergence=True)
def ipo(x: PairLogps, args) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17), on per-token average scores: beta is the paper's tau."""
    return (_length_normalized_delta(x, args) - 1 / (2 * args.beta)) ** 2


@register("exo_pair", f_divergence=True)
def exo_pair(x: PairLogps, args) -> torch.Tensor:
    """EXO (Ji et al. 2024, Eq. 16): KL from the policy's pair distribution to [1 - eps, eps]."""
    eps, logits = args.label_smoothing, args.beta * _delta(x, args)
    chosen_term = torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
    rejected_term = torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps))
    return chosen_term + rejected_term


@register("nca_pair")
def nca_pair(x: PairLogps, args) -> torch.Tensor:
    """NCA (Chen et al. 2024), on absolute rewards."""
    chosen, rejected = args.beta * x.chosen_logratios, args.beta * x.rejected_logratios
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


@register("robust", f_divergence=True)
def robust(x: PairLogps, args) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under labels flipped with probability eps."""
    eps, logits = args.label_smoothing, args.beta * _delta(x, args)
    return (-(1 - eps) * F.logsigmoid(logits) + eps * F.logsigmoid(-logits)) / (1 - 2 * eps)


@register("bco_pair")
def bco_pair(x: PairLogps, args) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024); TRL 1.16 keeps no running reward baseline here."""
    return -F.logsigmoid(args.beta * x.chosen_logratios) - F.logsigmoid(-args.beta * x.rejected_logratios)


@register("sppo_hard")
def sppo_hard(x: PairLogps, args) -> torch.Tensor:
    """SPPO (Wu et al. 2024) with hard win probabilities: 1 for chosen, 0 for rejected."""
    return (x.chosen_logratios - 0.5 / args.beta) ** 2 + (x.rejected_logratios + 0.5 / args.beta) ** 2


@register("aot", sorts_pairs=True)
def aot(x: PairLogps, args) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), paired: sorted policy margins against sorted reference margins."""
    policy, _ = torch.sort(x.chosen - x.rejected, dim=0)
    reference, _ = torch.sort(x.ref_chosen - x.ref_rejected, dim=0)
    return _smoothed_sigmoid(args.beta * (policy - reference), args.label_smoothing)


@register("aot_unpaired", sorts_pairs=True)
def aot_unpaired(x: PairLogps, args) -> torch.Tensor:
    """AOT, unpaired: sorted chosen log-ratios against sorted rejected log-ratios."""
    chosen, _ = torch.sort(x.chosen_logratios, dim=0)
    rejected, _ = torch.sort(x.rejected_logratios, dim=0)
    return _smoothed_sigmoid(args.beta * (chosen - rejected), args.label_smoothing)


@register("apo_zero")
def apo_zero(x: PairLogps, args) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, Eq. 7): raise chosen, lower rejected."""
    return 1 - torch.sigmoid(args.beta * x.chosen_logratios) + torch.sigmoid(args.beta * x.rejected_logratios)


@register("apo_down")
def apo_down(x: PairLogps, args) -> torch.Tensor:
    """APO-down (Eq. 8): lower chosen, lower rejected more."""
    margin = x.chosen_logratios - x.rejected_logratios
    return torch.sigmoid(args.beta * x.chosen_logratios) + 1 - torch.sigmoid(args.beta * margin)


@register("discopop", f_divergence=True)
def discopop(x: PairLogps, args) -> torch.Tensor:
    """DiscoPOP (Lu et al. 2024, Eq. 5): logistic and exponential losses mixed by sigmoid(logits / tau)."""
    logits = args.beta * _delta(x, args)
    mix = torch.sigmoid(logits / args.discopop_tau)
    return -F.logsigmoid(logits) * (1 - mix) + torch.exp(-logits) * mix


@register("sft", f_divergence=True, token_mean=True)
def sft(x: PairLogps, args) -> torch.Tensor:
    """Negative log-likelihood per chosen completion token, over the whole micro-batch (one value,
    repeated per pair so it weights and averages like the others)."""
    return (-x.sft_logps.sum() / x.sft_tokens.sum()).expand(x.chosen.shape[0])


@register("sigmoid_norm", f_divergence=True)
def sigmoid_norm(x: PairLogps, args) -> torch.Tensor:
    """The sigmoid loss on per-token average scores."""
    return -F.logsigmoid(args.beta * _length_normalized_delta(x, args))


@dataclass(frozen=True)
class PieceShare:
    """A piece of a micro-batch (padding_free_max_tokens): its share of the micro-batch's pairs and of
    its scored chosen tokens. Its loss terms, weighted by these, sum over the pieces to the micro-batch's."""
    pairs: float
    chosen_tokens: float


def dpo_loss(x: PairLogps, args, share: Optional[PieceShare] = None) -> torch.Tensor:
    """sum_k loss_weight_k * mean over pairs of loss_k (times the WPO weight of each pair, if any); for a
    piece of a micro-batch, each term times the piece's share (of the chosen tokens for sft, else of the pairs)."""
    total = 0.0
    for name, weight in zip(args.loss_types, args.weights):
        if share is not None:
            weight = weight * (share.chosen_tokens if name in TOKEN_MEAN_LOSSES else share.pairs)
            if weight == 0.0:  # a piece without chosen tokens adds nothing to sft's mean (its own would be 0/0)
                continue
        per_pair = LOSSES[name](x, args)
        if x.weights is not None:
            per_pair = per_pair * x.weights
        total = total + per_pair.mean() * weight
    return total


def rewards(x: PairLogps, beta: float):
    """Implicit rewards beta * log(pi/pi_ref) for chosen and rejected, detached (f-divergence or not)."""
    return beta * x.chosen_logratios.detach(), beta * x.rejected_logratios.detach()


def router_aux_loss_coef(text_config, coef: Optional[float]) -> float:
    """The weight of an MoE model's load-balancing loss in the DPO loss, as TRL 1.16 decides it: only for a
    model whose (text) config has `output_router_logits` (a Mixture-of-Experts model that can return its
    router logits); `coef` (DPOConfig.router_aux_loss_coef), or when None the config's own
    router_aux_loss_coef. 0.0: no auxiliary loss. A coef set for a model that is not MoE is an error."""
    moe = hasattr(text_config, "output_router_logits")
    if coef and not moe:
        raise ValueError(f"DPOConfig.router_aux_loss_coef is {coef} but the model ({type(text_config).__name__}) is "
                         "not a Mixture-of-Experts model that returns its router logits: there is no auxiliary "
                         "loss to weight")
    if not moe:
        return 0.0
    return float(getattr(text_config, "router_aux_loss_coef", 0.0) if coef is None else coef)
