"""Attention over the segments of a padding-free row, one sequence (or one shared-prompt pair) at a time.

A padding-free row lays every sequence of a micro-batch end to end. sdpa reads its structure as a
dense [1, 1, S, S] mask (built by transformers from the position ids, or by `collate_padding_free`
for shared prompts) and computes attention over the whole row, S^2, although each token only sees its
own sequence: with 8 sequences of ~300 tokens, 8x the attention work, and through the masked kernel.

`collate_padding_free` therefore also describes the row as segments, `Batch.segments`: (start, end,
blocked) per sequence (or pair), where blocked lists the (query range, key range) blocks a shared
prompt's rejected tokens skip (the chosen ones). `segment_kwargs` passes them to the model as the
keyword argument `raydpo_segments`, which transformers' models hand on to their attention function;
raydpo's sdpa (`segment_sdpa`, registered under transformers' own "sdpa" name with `install`) runs
transformers' sdpa once per segment: causal without a mask (the fast kernel) where nothing is blocked,
with the segment's own small mask otherwise.

Never silently wrong: a model's first forward with segments also gets the row's structure in the form
its kernel reads without them (`dense_mask` with a shared prompt, else none: transformers builds it from
the position ids), and `watch` records whether the segments reached raydpo's sdpa (a forward may take
keyword arguments without handing them to its attention: StableLM's). Once they are seen to arrive,
the model's forwards get a stand-in 4-D mask of one stored element instead (`unread_mask`), so that
transformers builds no [1, 1, S, S] mask either; raydpo's sdpa never reads it. A call without segments
is transformers' sdpa, unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

SEGMENTS_KWARG = "raydpo_segments"
# (start, end, ((query start, query end), (key start, key end)), ...): one sequence, or one shared-prompt pair
Segment = Tuple[int, int, Tuple[Tuple[Tuple[int, int], Tuple[int, int]], ...]]

_transformers_sdpa = None  # transformers' own sdpa_attention_forward, which segment_sdpa calls per segment
_segment_calls = 0  # segment_sdpa's calls with segments in this process, for `watch`
_arrive: Dict[type, bool] = {}  # model class -> whether its forward was seen handing segments to attention


def install() -> None:
    """Register `segment_sdpa` as transformers' "sdpa" attention in this process (idempotent). It is
    transformers' sdpa for every call that carries no segments."""
    global _transformers_sdpa
    if _transformers_sdpa is not None:
        return
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    _transformers_sdpa = sdpa_attention_forward
    AttentionInterface.register("sdpa", segment_sdpa)


def segment_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                 **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query [B, H, S, D], key and value [B, H_kv, S, D];
    returns [B, S, H, D]. With `raydpo_segments` (one row), each segment attends only to itself."""
    segments: Optional[Sequence[Segment]] = kwargs.pop(SEGMENTS_KWARG, None)
    if segments is None:
        return _transformers_sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"{SEGMENTS_KWARG} describes one padding-free row; the batch has {query.shape[0]}")
    global _segment_calls
    _segment_calls += 1
    # This layer's sliding window, where it has one: transformers' sdpa reads it from the mask its model
    # builds, which the segments replace, so it is applied here.
    window = kwargs.get("sliding_window")
    outputs = []
    for start, end, blocked in segments:
        mask = None  # causal: transformers' sdpa passes is_causal to the kernel
        if blocked or window:  # a shared prompt's rejected tokens skip the chosen ones; a window reached
            mask = pair_mask(end - start, _from_start(start, blocked), window, query.device)
        part = slice(start, end)
        out, _ = _transformers_sdpa(module, query[:, :, part], key[:, :, part], value[:, :, part], mask,
                                    dropout=dropout, scaling=scaling, **kwargs)
        outputs.append(out)  # [1, end - start, H, D]
    return torch.cat(outputs, dim=1), None


@functools.lru_cache(maxsize=64)
def pair_mask(length: int, blocked: Tuple[Tuple[Tuple[int, int], Tuple[int, int]], ...], window: Optional[int],
              device: torch.device) -> Optional[torch.Tensor]:
    """A segment's own [1, 1, length, length] mask: causal, less its blocked (query range, key range)
    blocks, given from the segment's start, and with a sliding `window` (transformers' rule: a query sees
    keys fewer than `window` positions back) measured in position ids: a blocked key range is the run of
    tokens just before its query range that the queries' sequence does not hold (a shared prompt's
    chosen tokens, before its rejected ones), so the queries' positions go back by its length. None where
    plain causal attention is exact (nothing blocked, no window reached).

    Every layer of a forward (and the recomputation under gradient checkpointing) asks for the same
    masks: each is built once, and segments of the same shape share it. Nobody writes to it (sdpa only
    reads its mask)."""
    positions = torch.arange(length, device=device)
    for (q0, q1), (k0, k1) in blocked:
        positions[q0:q1] -= k1 - k0
    reached = window is not None and int(positions.max()) >= window
    if not blocked and not reached:
        return None
    mask = _causal_block(length, blocked, device)
    if reached:
        mask &= (positions[:, None] - positions[None, :]) < window
    return mask[None, None]


def _causal_block(length: int, blocked, device) -> torch.Tensor:
    """[length, length] boolean: causal, less the blocked (query range, key range) blocks (from its start)."""
    mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    for (q0, q1), (k0, k1) in blocked:
        mask[q0:q1, k0:k1] = False
    return mask


def dense_mask(segments: Sequence[Segment], length: int, device) -> torch.Tensor:
    """The whole row's [1, 1, length, length] boolean mask the segments describe (True: attend): each
    segment causal within itself, less its blocked blocks. For a kernel the segments do not reach (eager
    attention on a shared-prompt padding-free row); it costs length^2, which the segments avoid."""
    mask = torch.zeros((1, 1, length, length), dtype=torch.bool, device=device)
    for start, end, blocked in segments:
        mask[0, 0, start:end, start:end] = _causal_block(end - start, _from_start(start, blocked), device)
    return mask


def _from_start(start: int, blocked) -> Tuple[Tuple[Tuple[int, int], Tuple[int, int]], ...]:
    """A segment's blocked (query range, key range) blocks, counted from the segment's start."""
    return tuple(((q0 - start, q1 - start), (k0 - start, k1 - start)) for (q0, q1), (k0, k1) in blocked)


def segments_arrive(model) -> bool:
    """Whether a forward of this model's class has been seen handing the segments on to its attention
    (`watch`). A forward that takes keyword arguments need not pass them on (StableLM's does not)."""
    return _arrive.get(type(model), False)


@contextlib.contextmanager
def watch(model):
    """Around a forward given segments: records whether they reached raydpo's sdpa (`segments_arrive`)."""
    before = _segment_calls
    yield
    _arrive[type(model)] = _segment_calls > before


def unread_mask(length: int, device) -> torch.Tensor:
    """A [1, 1, length, length] mask of one stored element, for a forward whose attention goes by the
    segments: transformers hands a 4-D mask on as it is, so it builds no length^2 mask of its own, and
    raydpo's sdpa, given the segments, never reads it."""
    return torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device).expand(1, 1, length, length)


def segment_kwargs(model, kernel: Optional[str], segments: Optional[Sequence[Segment]]) -> dict:
    """The model's extra keyword argument for a padding-free batch: its segments, where the model runs
    transformers' sdpa (kernel None or "sdpa") and its forward takes keyword arguments to pass on."""
    if segments is None or not takes_segments(model, kernel):
        return {}
    install()
    return {SEGMENTS_KWARG: tuple(segments)}


@functools.lru_cache(maxsize=None)
def forward_parameters(model_class) -> Mapping[str, inspect.Parameter]:
    """The parameters of a model class's forward, by name; empty where its signature cannot be read.
    Read once per class, not once per step (logprobs.py asks it too)."""
    try:
        return inspect.signature(model_class.forward).parameters  # read-only, so the cached value stays as read
    except (TypeError, ValueError):
        return {}


def takes_segments(model, kernel: Optional[str]) -> bool:
    """Whether a padding-free batch's segments reach raydpo's sdpa in this model: it runs transformers'
    sdpa (kernel None or "sdpa") and its forward takes keyword arguments, which it hands on to attention."""
    return kernel in (None, "sdpa") and any(p.kind is inspect.Parameter.VAR_KEYWORD
                                            for p in forward_parameters(type(model)).values())
