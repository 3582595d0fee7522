"""FLOPs of DPO steps, and the peak of a worker's GPU, for MFU (model-FLOPs utilisation, as NeMo-RL
and open-instruct log it) and HFU (hardware-FLOPs utilisation). bench/mfu.py and bench/compare_trl.py
count the same way.

Model FLOPs (`step_flops`) count useful work on non-pad tokens only (PaLM's definition):
- a forward costs 2 FLOPs per weight-matrix parameter per token (the LM head included; the
  embedding lookup is free) plus causal attention, 2 * layers * hidden * length^2 per sequence
  (QK^T and AV over the lower triangle);
- the policy runs forward and backward (3 forwards' worth), the reference one forward when it runs
  in the step (not when its log-probs were precomputed or streamed from the actor pool);
- chosen and rejected sequences are each counted whole (prompt included), as TRL computes them. The
  FLOPs raydpo saves (a shared prompt run once, the LM head skipped where no token is scored,
  padding-free rows) are not subtracted: MFU measures the recipe's work per second, so it can pass
  100%.

Hardware FLOPs (`hardware_flops`) count what a collated micro-batch (data/batching.py) makes the
device run, from the batch's own shape:
- the body's weight matrices on every position of input_ids, pads included (they are computed):
  [2B, T] padded, [B, S] shared prompt (each prompt once), [1, S] padding-free (no pads);
- attention as the kernel runs it, at the same 2 * layers * hidden * span^2 per span: sdpa and eager
  take a materialised mask and run each row whole (a padded row of width T, a shared-prompt row, the
  padding-free row, whose [S, S] block-diagonal mask transformers builds from the position ids);
  FlashAttention and flex_attention run each sequence on its own (`attention_spans`);
- the LM head only where raydpo applies it (`lm_head_positions`): in the padded layout every row from
  the first position any row scores (logprobs.first_scored_position); in the gathered layouts (shared
  prompt, padding-free) the gathered positions, gather_index's [2B, L - 1];
- the policy 3 passes (forward, backward), plus one more body forward with gradient checkpointing
  (each layer recomputed in the backward); the reference one pass when it runs in the step.
Not counted: the one position per row whose logits a body-only forward returns (logits_to_keep=1),
the head's recompute when `logprobs.head_completion_stats` chunks it (logits over 1 GiB), the
padded layout's head on every position for a model that takes no logits_to_keep, a vision
tower, and the upper triangle that sdpa computes under an explicit mask (it can double attention's
share): the count is a floor of what runs, not a profile.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch

from raydpo.data.batching import Batch
from raydpo.logprobs import first_scored_position

# Dense bf16/fp16 tensor-core peaks (FLOP/s) of NVIDIA data-centre GPUs, from their datasheets (SXM
# parts; sparsity not counted), matched against torch.cuda.get_device_name().
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def matmul_parameters(config) -> int:
    """Weight-matrix parameters a token passes through: every layer's projections and the LM head."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    q = hidden * heads * head_dim
    kv = 2 * hidden * kv_heads * head_dim
    o = heads * head_dim * hidden
    mlp = 3 * hidden * config.intermediate_size
    return layers * (q + kv + o + mlp) + hidden * config.vocab_size


def forward_flops(config, positions: int, head_positions: int, attention_spans: Iterable[int]) -> float:
    """One forward: 2 FLOPs per weight of the body's matrices per position it runs on, 2 per weight of the
    LM head per position the head runs on, and causal attention, 2 * layers * hidden * span^2 per span."""
    head = config.hidden_size * config.vocab_size
    body = matmul_parameters(config) - head
    attention = 2 * config.num_hidden_layers * config.hidden_size * sum(s * s for s in attention_spans)
    return 2 * body * positions + 2 * head * head_positions + attention


def step_flops(config, sequence_lengths: Iterable[int], reference_forward: bool = True) -> float:
    """Model FLOPs of training on sequences of these (non-pad) lengths: the policy's forward and
    backward, and the reference's forward when it runs in the step."""
    lengths = list(sequence_lengths)
    forward = forward_flops(config, sum(lengths), sum(lengths), lengths)  # each sequence alone, head on every token
    return forward * (3 + (1 if reference_forward else 0))


def attention_spans(batch: Batch, kernel: Optional[str]) -> List[int]:
    """The lengths the attention kernel (config._attn_implementation; None is transformers' sdpa) runs
    over in this batch, one per block it computes."""
    rows, width = batch.input_ids.shape
    mask = batch.attention_mask
    if batch.segments is not None and kernel in (None, "sdpa"):  # raydpo's sdpa: each segment alone (segment_attention.py)
        return [end - start for start, end, _ in batch.segments]
    per_sequence = kernel is not None and ("flash" in kernel or "flex" in kernel)
    if per_sequence and mask is not None and mask.dim() == 2:  # padded: each row's tokens, unpadded
        return mask.sum(1).tolist()
    if per_sequence and mask is None:  # padding-free: a sequence starts wherever its position id is 0
        starts = (batch.position_ids[0] == 0).nonzero().flatten().tolist() + [width]
        return [end - start for start, end in zip(starts, starts[1:])]
    return [width] * rows  # a materialised mask (sdpa, eager; any [B, 1, S, S] mask): the whole row


def lm_head_positions(batch: Batch) -> int:
    """The positions raydpo's LM head runs on for this batch (logprobs._completion_view)."""
    if batch.gathered:  # only the hidden states that predict a scored token (and the index's padding slots)
        return batch.gather_index.numel()
    rows, width = batch.input_ids.shape
    return rows * (width - first_scored_position(batch.completion_mask))


def hardware_flops(config, batch: Batch, reference_forward: bool = True, gradient_checkpointing: bool = False,
                   head_positions: Optional[int] = None, head_passes: int = 3) -> float:
    """Hardware FLOPs of one micro-batch (this module's docstring says what counts): the policy's
    forward and backward, and the reference's forward when it runs in the step.

    head_positions / head_passes describe another trainer's LM head on the same batch (bench/compare_trl.py's
    TRL, whose chunked head recomputes its logits in the backward: 4 passes); by default raydpo's."""
    if head_positions is None:
        head_positions = lm_head_positions(batch)
    body = forward_flops(config, batch.input_ids.numel(), 0,
                         attention_spans(batch, getattr(config, "_attn_implementation", None)))
    head = forward_flops(config, 0, head_positions, [])
    policy = (3 + (1 if gradient_checkpointing else 0)) * body + head_passes * head
    return policy + (body + head if reference_forward else 0)


def sequence_lengths(rows: Iterable[dict], max_length: Optional[int]) -> List[int]:
    """Each chosen and each rejected sequence's length (prompt + completion), truncated to max_length."""
    return [min(max_length or 2 ** 62, len(row["prompt_ids"]) + len(row[side]))
            for row in rows for side in ("chosen_ids", "rejected_ids")]


def gpu_peak_flops(dtype: torch.dtype) -> Optional[float]:
    """This process's GPU's dense peak for bf16/fp16 matmuls, when it is in GPU_PEAK_FLOPS; None
    otherwise (a CPU, an unlisted GPU, or float32)."""
    if dtype not in (torch.bfloat16, torch.float16) or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in GPU_PEAK_FLOPS.items() if key in name), None)
