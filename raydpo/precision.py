"""Mixed precision, with TRL's field names (`bf16`, `fp16`, `tf32`).

bf16 is TRL's single-process bf16: float32 weights, matmuls under torch autocast (DeepSpeed's
`torch_autocast` section for the policy, `autocast` here for every other forward). DeepSpeed's own bf16
(bf16 weights, float32 master weights in the optimizer, as TRL runs under DeepSpeed) is used only when
the DeepSpeed dict asks for it ("bf16": {"enabled": true}): its bf16 copy of the weights hardly moves at
small learning rates (docs/trainer.md, "Mixed precision"). fp16 is DeepSpeed's (fp16 weights and its
dynamic loss scaler). Every reference mode computes as the policy does: weights in `weights_dtype`,
under the same autocast. Log-probs and losses are computed in float32 or wider (logprobs.py).

`resolve` makes `bf16=None` definite in each worker process, where the device is known: True on a
GPU that supports it (TRL's default), False on CPU workers (TRL would use CPU autocast; raydpo's CPU
runs stay in float32, where they match TRL's numbers). `gradient_checkpointing=None` resolves the
same way: TRL's True on GPU workers, False on CPU workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch

from raydpo.config import DPOConfig


def resolve(config: DPOConfig, on_gpu: bool) -> DPOConfig:
    """The defaults that depend on the device, made definite for a process whose device is a GPU
    (`on_gpu`) or a CPU:
    - bf16=None: the DeepSpeed dict's bf16 when it sets one, else True on a bf16-capable GPU when fp16
      is off, else False;
    - gradient_checkpointing=None: True on a GPU (TRL's default), False on a CPU.
    fp16 on a CPU without float16 arithmetic is refused by name."""
    bf16, checkpointing = config.bf16, config.gradient_checkpointing
    if config.fp16 and not on_gpu and not cpu_has_fp16():
        # DeepSpeed's CPU accelerator would refuse it too ("Type fp16 is not supported on your device"),
        # without saying which setting or what to use instead.
        raise ValueError("fp16=True: this CPU worker has no float16 arithmetic (oneDNN needs AVX512-FP16 or "
                         "AMX-FP16, which DeepSpeed's CPU accelerator checks); use bf16=True, or GPU workers")
    if bf16 is None:
        bf16 = config.deepspeed_enabled("bf16")
        if bf16 is None:
            bf16 = on_gpu and not config.fp16 and torch.cuda.is_bf16_supported()
    if checkpointing is None:
        checkpointing = on_gpu
    if (bf16, checkpointing) == (config.bf16, config.gradient_checkpointing):
        return config
    return dataclasses.replace(config, bf16=bf16, gradient_checkpointing=checkpointing)


def cpu_has_fp16() -> bool:
    """Whether this process's CPU computes in float16 (DeepSpeed's CPU accelerator asks oneDNN the same)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast_dtype(config: DPOConfig) -> Optional[torch.dtype]:
    """bfloat16 when a resolved config computes under torch autocast (bf16, unless the DeepSpeed dict
    asks for its bf16 weights), else None."""
    return torch.bfloat16 if config.bf16 and config.deepspeed_enabled("bf16") is not True else None


def weights_dtype(config: DPOConfig) -> torch.dtype:
    """The dtype a resolved config's models hold their weights in."""
    if config.fp16:
        return torch.float16
    if config.bf16 and autocast_dtype(config) is None:
        return torch.bfloat16
    return torch.float32


def compute_dtype(config: DPOConfig) -> torch.dtype:
    """The dtype a resolved config's matmuls run in (the GPU peak that mfu is measured against)."""
    return autocast_dtype(config) or weights_dtype(config)


def autocast(config: DPOConfig, device) -> contextlib.AbstractContextManager:
    """The forward passes' context: torch autocast to autocast_dtype on `device`'s type, or nothing.
    (Around the policy's DeepSpeed engine it nests with the engine's own, to the same dtype.)"""
    dtype = autocast_dtype(config)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def place(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen model (a reference) on `device`, its parameters in `dtype` (weights_dtype), cast as
    DeepSpeed casts the policy under bf16/fp16: parameters only. Buffers keep their dtype, so RoPE's
    float32 inv_freq stays float32 in both models and, before the first update, the reference computes
    bit for bit what the policy computes (a blanket `model.to(bf16)` rounds inv_freq too: on SmolLM2 that
    gave step-1 rewards of 3e-2 instead of 0). float32 casts nothing: a model loaded in another dtype on
    purpose (model_init_kwargs "dtype") under float32 training stays so."""
    model.to(device=device)
    if dtype != torch.float32:
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
    return model


def fill_deepspeed(ds: dict, config: DPOConfig) -> None:
    """DeepSpeed's bf16/fp16 sections from a resolved config, and its torch_autocast section under
    autocast; DPOConfig has checked that the user's own "enabled" values agree (a contradiction is an
    error there, naming both). Under autocast the gradients are reduced in float32, as DDP reduces them
    under TRL's autocast (DeepSpeed would otherwise send Linear layers' gradients in bf16)."""
    autocasting = autocast_dtype(config) is not None
    for section, enabled in (("bf16", bool(config.bf16) and not autocasting), ("fp16", bool(config.fp16))):
        part = ds.setdefault(section, {})
        if part.get("enabled", "auto") == "auto":
            part["enabled"] = enabled
    if autocasting:
        section = ds.setdefault("torch_autocast", {})
        section.setdefault("enabled", True)
        section.setdefault("dtype", "bfloat16")
        section.setdefault("lower_precision_safe_modules", [])


def set_tf32(config: DPOConfig) -> None:
    """TF32 matmuls and convolutions on NVIDIA Ampere or newer, as transformers sets them (tf32=None
    leaves torch's defaults). DPOConfig refuses tf32=True for CPU workers."""
    if config.tf32 is not None and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = config.tf32
        torch.backends.cudnn.allow_tf32 = config.tf32
