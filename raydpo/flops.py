"""Model FLOPs of DPO steps, and the peak of a worker's GPU, for MFU (model-FLOPs utilisation, as
NeMo-RL and open-instruct log it). bench/mfu.py and bench/compare_trl.py count the same way.

Model FLOPs count useful work on non-pad tokens only (PaLM's definition):
- a forward costs 2 FLOPs per weight-matrix parameter per token (the LM head included; the
  embedding lookup is free) plus causal attention, 2 * layers * hidden * length^2 per sequence
  (QK^T and AV over the lower triangle);
- the policy runs forward and backward (3 forwards' worth), the reference one forward when it runs
  in the step (not when its log-probs were precomputed or streamed from the actor pool);
- chosen and rejected sequences are each counted whole (prompt included), as TRL computes them. The
  FLOPs raydpo saves (a shared prompt run once, the LM head skipped where no token is scored,
  padding-free rows) are not subtracted: MFU measures the recipe's work per second.
"""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch

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


def step_flops(config, sequence_lengths: Iterable[int], reference_forward: bool = True) -> float:
    """Model FLOPs of training on sequences of these (non-pad) lengths: the policy's forward and
    backward, and the reference's forward when it runs in the step."""
    n = matmul_parameters(config)
    forward = sum(2 * n * t + 2 * config.num_hidden_layers * config.hidden_size * t * t for t in sequence_lengths)
    return forward * (3 + (1 if reference_forward else 0))


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
