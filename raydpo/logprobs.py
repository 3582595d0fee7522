"""Completion log-probs and token metrics from a causal LM's logits, chunked over the sequence.

Only a [N, chunk, V] float32 slice exists at a time: the forward folds each chunk into per-token
values ([N, T] each), and the backward recomputes the chunk's softmax instead of keeping it. With a
bf16 model, a plain `logits.float().log_softmax(-1)` would keep a whole [N, T, V] float32 copy alive
until the backward; this keeps none.

Token t is predicted by the logits at t-1, so labels and masks are shifted left by one, and a
completion token at position 0 is never scored (as in TRL).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from raydpo.data.batching import Batch
from raydpo.loss_weights import wpo_weights
from raydpo.losses import PairLogps
from raydpo.segment_attention import dense_mask, forward_parameters, segment_kwargs, segments_arrive, unread_mask, watch

# Elements of one float32 [N, chunk, V] slice (64 MiB): the chunk length adapts to batch and vocabulary.
CHUNK_ELEMENTS = 2 ** 24


def _chunk_size(logits: torch.Tensor, chunk_size: Optional[int]) -> int:
    return chunk_size or max(1, CHUNK_ELEMENTS // (logits.shape[0] * logits.shape[-1]))


class _ChunkedTokenLogps(torch.autograd.Function):
    """log p(labels[:, t]) under logits[:, t] for t < L = labels.shape[1], and detached per-position
    metrics, each [N, L]. It takes the whole [N, T, V] logits rather than a slice, so the backward
    writes one gradient of the logits' own shape (a slice would add a second full-size copy)."""

    @staticmethod
    def forward(ctx, logits, labels, chunk_size: int, with_metrics: bool, with_sum_sq: bool):
        n, length = labels.shape
        dtype = torch.promote_types(logits.dtype, torch.float32)  # at least float32, as TRL; float64 stays
        new = lambda: torch.zeros(n, length, dtype=dtype, device=logits.device)  # noqa: E731
        logps, lse = new(), new()
        entropy, mean_logits, top1 = (new(), new(), new()) if with_metrics else (None, None, None)
        log_sum_sq = new() if with_sum_sq else None
        for start in range(0, length, chunk_size):
            part = slice(start, min(start + chunk_size, length))
            z = logits[:, part].to(dtype)
            label = labels[:, part]
            if not (with_metrics or with_sum_sq):  # the reference's case: log-probs only
                lse[:, part] = torch.logsumexp(z, -1)
            else:  # one pass for the max and argmax, one exp, then sums over it: each pass reads [N, chunk, V]
                top, argmax = z.max(-1)  # the first of tied maxima, as TRL's argmax
                e = (z - top.unsqueeze(-1)).exp_()  # softmax * total, the one chunk-sized temporary
                total = e.sum(-1)
                lse[:, part] = top + total.log()
                if with_sum_sq:  # log sum_v p_v^2, for WPO's weights (sum_v e_v^2 >= 1: the max's e is 1)
                    log_sum_sq[:, part] = e.square().sum(-1).log() - 2 * total.log()
                if with_metrics:
                    # lse - sum_v p_v z_v, with p = e / total: exp(z - lse) would carry lse's rounding into
                    # every p (7e-5 off at a two-way tie of logit 50, where this is 1.4e-6 off); e's last use
                    entropy[:, part] = lse[:, part] - e.mul_(z).sum(-1) / total
                    mean_logits[:, part] = z.mean(-1)  # over the whole vocabulary, padded rows included, as TRL
                    top1[:, part] = (argmax == label).float()
            logps[:, part] = z.gather(-1, label.unsqueeze(-1)).squeeze(-1) - lse[:, part]
        ctx.save_for_backward(logits, labels, lse)
        ctx.chunk_size = chunk_size
        extras = [t for t in (entropy, mean_logits, top1, log_sum_sq) if t is not None]
        ctx.mark_non_differentiable(*extras)
        return logps, entropy, mean_logits, top1, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logps, *_):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        grad[:, labels.shape[1]:] = 0  # positions past L predict nothing
        in_place = logits.dtype == lse.dtype  # float32 logits: each chunk is computed in grad itself
        for start in range(0, labels.shape[1], ctx.chunk_size):
            part = slice(start, min(start + ctx.chunk_size, labels.shape[1]))
            g = grad_logps[:, part, None]
            # d log p(label) / dz = onehot(label) - softmax(z)
            chunk = torch.sub(logits[:, part].to(lse.dtype), lse[:, part, None],
                              out=grad[:, part] if in_place else None)
            chunk.exp_().mul_(-g).scatter_add_(-1, labels[:, part, None], g)
            if not in_place:
                grad[:, part] = chunk
        return grad, None, None, None, None


@dataclass
class CompletionStats:
    """Per-sequence sums over the scored completion tokens, shape [N] each."""

    logps: torch.Tensor  # sum of weight_t * log p_t: the sequence log-prob the losses use
    token_logps: torch.Tensor  # sum of log p_t, unweighted (the sft loss)
    tokens: torch.Tensor  # scored completion tokens
    entropy: Optional[torch.Tensor] = None  # sum of full-vocabulary entropies (detached)
    mean_logits: Optional[torch.Tensor] = None  # sum of vocabulary-mean logits (detached)
    correct: Optional[torch.Tensor] = None  # tokens whose argmax is the label (detached)
    wpo: Optional[torch.Tensor] = None  # sum of log p_t - log sum_v p_v^2 (detached)
    aux_loss: Optional[torch.Tensor] = None  # an MoE model's load-balancing loss for the whole batch (a scalar)


def completion_stats(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                     weights: Optional[torch.Tensor] = None, metrics: bool = False, wpo: bool = False,
                     chunk_size: Optional[int] = None) -> CompletionStats:
    """Sums over completion tokens. `weights` ([N, T], aligned with input_ids) replaces the completion
    mask in `logps` only; it carries LD-DPO's down-weighting of a longer completion's tail."""
    values = _ChunkedTokenLogps.apply(logits, input_ids[:, 1:], _chunk_size(logits, chunk_size), metrics, wpo)
    return _sums(completion_mask, weights, wpo, *values)


def _sums(completion_mask, weights, wpo: bool, logps, entropy, mean_logits, top1, log_sum_sq) -> CompletionStats:
    """Per-position values [N, L] summed over each sequence's scored tokens."""
    mask = completion_mask[:, 1:].float()
    weight = mask if weights is None else weights[:, 1:].float()
    masked_sum = lambda t: None if t is None else (t * mask).sum(1)  # noqa: E731
    return CompletionStats(
        logps=(logps * weight).sum(1), token_logps=masked_sum(logps), tokens=mask.sum(1),
        entropy=masked_sum(entropy), mean_logits=masked_sum(mean_logits), correct=masked_sum(top1),
        wpo=masked_sum(logps.detach() - log_sum_sq) if wpo else None)


# Above this many bytes of [N, L, V] logits the policy's LM head runs chunk by chunk (`head_completion_stats`).
FUSED_HEAD_BYTES = 2 ** 30


def _head_chunk(head, hidden, labels, with_metrics: bool, with_sum_sq: bool):
    """One chunk of the LM head and its per-position values, as `_ChunkedTokenLogps` computes them."""
    logits = head(hidden)
    return _ChunkedTokenLogps.apply(logits, labels, labels.shape[1], with_metrics, with_sum_sq)


def _vocabulary(head: torch.nn.Module) -> int:
    """The LM head's output size (out_features: ZeRO-3 leaves a partitioned weight's own shape empty)."""
    return head.out_features if hasattr(head, "out_features") else head.weight.shape[0]


def head_completion_stats(head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                          completion_mask: torch.Tensor, weights: Optional[torch.Tensor] = None,
                          metrics: bool = False, wpo: bool = False, chunk_size: Optional[int] = None) -> CompletionStats:
    """`completion_stats` of `head(hidden)` without ever holding the [N, L, V] logits: hidden[:, t]
    predicts input_ids[:, t + 1]. Each chunk of positions runs the head under torch's (non-reentrant)
    activation checkpointing, so the backward recomputes that chunk's logits instead of keeping them:
    one extra LM-head matmul for a [N, chunk, V] peak instead of [N, L, V] (TRL 1.16's fused LM head
    does the same). The head runs as a module, so ZeRO-3 gathers its weight as for any forward."""
    from torch.utils.checkpoint import checkpoint

    labels = input_ids[:, 1:]
    length = labels.shape[1]
    size = chunk_size or max(1, CHUNK_ELEMENTS // (labels.shape[0] * _vocabulary(head)))
    parts = [checkpoint(_head_chunk, head, hidden[:, start:start + size], labels[:, start:start + size], metrics, wpo,
                        use_reentrant=False)
             for start in range(0, length, size)]
    joined = [None if parts[0][i] is None else torch.cat([part[i] for part in parts], 1) for i in range(5)]
    return _sums(completion_mask, weights, wpo, *joined)


def completion_logps(logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                     chunk_size: Optional[int] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of log p(token | prefix) over completion tokens, per sequence: shape [N]."""
    return completion_stats(logits, input_ids, completion_mask, weights, chunk_size=chunk_size).logps


def _accepts_logits_to_keep(model) -> bool:
    """Whether the underlying transformers model takes `logits_to_keep` (DeepSpeed and PEFT wrappers
    pass keyword arguments through)."""
    return "logits_to_keep" in forward_parameters(type(unwrapped(model)))


@dataclass
class _CompletionView:
    """What the log-probs are read from, in `collate`'s [2B, ...] per-side layout: either `logits`
    (position t scores input_ids[:, t + 1]), or `hidden` states with the model's LM `head`, which
    `head_completion_stats` runs chunk by chunk (the [2B, L, V] logits never exist)."""

    input_ids: torch.Tensor
    completion_mask: torch.Tensor
    weights: Optional[torch.Tensor]
    aux_loss: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    head: Optional[torch.nn.Module] = None

    def stats(self, metrics: bool = False, wpo: bool = False) -> CompletionStats:
        if self.hidden is not None:
            return head_completion_stats(self.head, self.hidden, self.input_ids, self.completion_mask, self.weights,
                                         metrics=metrics, wpo=wpo)
        return completion_stats(self.logits, self.input_ids, self.completion_mask, self.weights, metrics=metrics,
                                wpo=wpo)


def _fuse_head(model, rows: int, positions: int) -> bool:
    """Run the LM head chunk by chunk when the [rows, positions, V] logits would pass FUSED_HEAD_BYTES
    (only for models whose logits are exactly lm_head(final hidden state))."""
    output_embeddings = getattr(unwrapped(model), "get_output_embeddings", None)
    head = output_embeddings() if output_embeddings else None
    if head is None or not hasattr(head, "weight"):
        return False
    size = rows * positions * _vocabulary(head) * max(head.weight.element_size(), 4)  # log-softmax is >= float32
    return size > FUSED_HEAD_BYTES and shares_prompt_safely(model)


def _completion_view(model, batch: Batch, router_logits: bool = False) -> _CompletionView:
    """The model's forward over the batch, skipping logits no token needs:

    - padded batches: the LM head runs only from the first position any sequence scores (the
      prompt part is never scored; the head is most of a small model's FLOPs and a [N, T, V] tensor);
      a vision batch's pixel values (`batch.images`) go to the same forward;
    - the gathered layouts (`collate_shared_prompt`, `collate_padding_free`): the body runs once per
      pair (or once per micro-batch), and the head only on the hidden states that predict a completion
      token, gathered into the per-side layout.
    Where the logits would be large (`_fuse_head`), the head is left to `head_completion_stats`.

    router_logits: an MoE model also returns its load-balancing loss (`output_router_logits=True`, as
    TRL asks for it) over the batch's attention mask; aux_loss is None otherwise. Padded batches only:
    a gathered batch routes other tokens than TRL's layout does.
    """
    if batch.gathered:
        if router_logits:
            raise ValueError("an MoE load-balancing loss needs the padded two-sequence layout "
                             "(share_prompt=False, padding_free=False)")
        segments = segment_kwargs(unwrapped(model), getattr(text_config(model), "_attn_implementation", None),
                                  batch.segments)  # padding-free under sdpa: attention within each sequence
        with watch(unwrapped(model)) if segments else contextlib.nullcontext():
            hidden = _hidden_states(model, input_ids=batch.input_ids, attention_mask=_gathered_mask(model, batch, segments),
                                    position_ids=batch.position_ids, **segments)[0]
        picked = hidden.reshape(-1, hidden.shape[-1])[batch.gather_index]
        view = _CompletionView(batch.side_input_ids, batch.completion_mask, batch.logp_weights)
        head = unwrapped(model).get_output_embeddings()
        if _fuse_head(model, *batch.gather_index.shape):
            view.hidden, view.head = picked, head
        else:
            view.logits = head(picked)
        return view
    input_ids, completion_mask, weights = batch.input_ids, batch.completion_mask, batch.logp_weights
    first = first_scored_position(completion_mask)
    kwargs = {"input_ids": input_ids, "attention_mask": batch.attention_mask, "use_cache": False, **batch.images}
    if router_logits:
        kwargs["output_router_logits"] = True
    cut = lambda t: None if t is None else t[:, first:]  # noqa: E731
    if not batch.images and _fuse_head(model, input_ids.shape[0], input_ids.shape[1] - first):
        hidden, outputs = _hidden_states(model, **kwargs)
        view = _CompletionView(cut(input_ids), cut(completion_mask), cut(weights), hidden=hidden[:, first:],
                               head=unwrapped(model).get_output_embeddings())
    else:
        if first > 0 and _accepts_logits_to_keep(model):
            kwargs["logits_to_keep"] = input_ids.shape[1] - first  # the last T - first positions
        else:
            first = 0
        outputs = model(**kwargs)
        view = _CompletionView(cut(input_ids), cut(completion_mask), cut(weights), logits=outputs.logits)
    if router_logits:  # a tensor, or 0 when the model returned no router logits
        view.aux_loss = torch.as_tensor(outputs.aux_loss, dtype=torch.float32, device=input_ids.device)
    return view


def first_scored_position(completion_mask: torch.Tensor) -> int:
    """The first position of a padded batch whose logits score a token in some row (0 if none): the
    padded layout's LM head runs from there on (`_completion_view`; flops.py counts it the same way)."""
    scored = completion_mask[:, 1:].any(0)  # position t predicts token t + 1
    return int(scored.float().argmax()) if bool(scored.any()) else 0


def _gathered_mask(model, batch: Batch, segments: dict) -> Optional[torch.Tensor]:
    """A gathered batch's attention mask, in the form the model's kernel reads: a padding-free row's
    comes from its segments (a stand-in where raydpo's sdpa has been seen to read the segments
    themselves; the dense mask where a shared prompt's rejected tokens must skip chosen ones; else None,
    for transformers to build from the position ids); a shared-prompt batch's is its own [B, 1, S, S]."""
    mask = batch.attention_mask
    if batch.segments is not None:
        length, device = batch.input_ids.shape[1], batch.input_ids.device
        if segments and segments_arrive(unwrapped(model)):
            return unread_mask(length, device)
        if any(blocked for _, _, blocked in batch.segments):
            mask = dense_mask(batch.segments, length, device)
    return _kernel_mask(model, mask)


def _kernel_mask(model, mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A gathered layout's boolean [B, 1, S, S] mask (True: attend) in the form the model's kernel reads.
    transformers hands a 4-D mask to the kernel as it is: sdpa takes a boolean one, but eager adds the
    mask to its scores, so it gets an additive one (0 where attended, the dtype's minimum elsewhere)."""
    if mask is None or mask.dtype != torch.bool or getattr(text_config(model), "_attn_implementation", None) != "eager":
        return mask
    dtype = next(unwrapped(model).parameters()).dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def unwrapped(model):
    """The transformers model inside a DeepSpeed engine and a PeftModel (the model itself otherwise)."""
    inner = getattr(model, "module", model)  # a DeepSpeed engine
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a PeftModel


def _hidden_states(model, **inputs) -> tuple:
    """(the body's final hidden states [N, T, H], the model's outputs). The model runs as usual
    (through its DeepSpeed engine, so ZeRO-3 gathering and autocast apply) with logits_to_keep=1; a
    hook takes the body's output, so the caller runs the LM head only where a token is scored."""
    captured = []
    hook = unwrapped(model).get_decoder().register_forward_hook(
        lambda module, args, output: captured.append(output[0]))
    try:
        outputs = model(**{"use_cache": False, **inputs}, logits_to_keep=1)
    finally:
        hook.remove()
    return captured[-1], outputs


def text_config(model):
    """The config of the language model inside `model` (a DeepSpeed engine, a PeftModel, a vision model)."""
    return unwrapped(model).config.get_text_config()


def shares_prompt_safely(model) -> bool:
    """The shared-prompt path applies the LM head itself: only for models whose logits are exactly
    lm_head(final hidden state) and that take logits_to_keep (no soft-capping or logit scaling)."""
    inner = unwrapped(model)
    config = getattr(inner, "config", None)
    extras = [getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale", "logits_scaling")]
    return (_accepts_logits_to_keep(model) and hasattr(inner, "get_decoder") and inner.get_output_embeddings() is not None
            and all(value in (None, 1, 1.0) for value in extras))


def model_completion_logps(model, batch: Batch) -> torch.Tensor:
    """One forward over the chosen+rejected batch; sequence log-probs [2B].

    A batch may carry `logp_weights` (LD-DPO, `loss_weights.ld_weights`); the reference must use the
    same weights as the policy, and reads them from the batch."""
    return _completion_view(model, batch).stats().logps


def model_completion_stats(model, batch: Batch, wpo: bool = False, router_logits: bool = False) -> CompletionStats:
    """The policy's forward: sequence log-probs and the token metrics, in one chunked pass (and with
    router_logits an MoE model's load-balancing loss)."""
    view = _completion_view(model, batch, router_logits)
    stats = view.stats(metrics=True, wpo=wpo)
    stats.aux_loss = view.aux_loss
    return stats


def pair_logps(policy: CompletionStats, ref_logps: torch.Tensor, completion_mask: torch.Tensor,
               use_weighting: bool = False) -> PairLogps:
    """Split [2B] chosen-first values into the pairs the losses see."""
    chosen, rejected = policy.logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    # ipo and sigmoid_norm divide by the completion mask's count, not the scored count, as TRL does;
    # they differ only when keep_end truncation puts a completion token at position 0.
    chosen_tokens, rejected_tokens = completion_mask.sum(1).float().chunk(2)
    weights = wpo_weights(policy.wpo, policy.tokens) if use_weighting else None
    return PairLogps(chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                     chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                     sft_logps=policy.token_logps.chunk(2)[0], sft_tokens=policy.tokens.chunk(2)[0],
                     weights=weights)
