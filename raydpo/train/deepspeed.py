"""DeepSpeed glue: the engine config built from DPOConfig, and the engines for policy and reference."""

from __future__ import annotations

import copy
import math

from raydpo.config import DPOConfig


def _fill(section: dict, key: str, value):
    """Set key unless the user set it to something other than "auto" (HF Trainer's convention)."""
    if section.get(key, "auto") == "auto":
        section[key] = value


def build_deepspeed_config(config: DPOConfig, world_size: int) -> dict:
    ds = copy.deepcopy(config.deepspeed_dict() or {})
    _fill(ds, "train_micro_batch_size_per_gpu", config.per_device_train_batch_size)
    _fill(ds, "gradient_accumulation_steps", config.gradient_accumulation_steps)
    _fill(ds, "train_batch_size", config.per_device_train_batch_size * config.gradient_accumulation_steps * world_size)
    _fill(ds, "gradient_clipping", config.max_grad_norm)
    zero = ds.setdefault("zero_optimization", {})
    _fill(zero, "stage", config.zero_stage if config.zero_stage is not None else (0 if world_size == 1 else 2))
    optimizer = ds.setdefault("optimizer", {"type": "AdamW"})
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", config.learning_rate)
    _fill(params, "betas", [config.adam_beta1, config.adam_beta2])
    _fill(params, "eps", config.adam_epsilon)
    _fill(params, "weight_decay", config.weight_decay)
    if not config.use_gpu:
        # On CPU: torch's AdamW rather than DeepSpeed's compiled CPU Adam (no build toolchain needed).
        params.setdefault("torch_adam", True)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)  # raydpo prints its own progress lines
    return ds


def reference_deepspeed_config(train_config: dict) -> dict:
    """For a frozen reference under ZeRO-3: shard it the same way, with no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": train_config["train_micro_batch_size_per_gpu"],
        "train_batch_size": train_config["train_batch_size"],
        "gradient_accumulation_steps": train_config["gradient_accumulation_steps"],
        "zero_optimization": {"stage": 3},
        "bf16": train_config.get("bf16", {"enabled": False}),
        "fp16": train_config.get("fp16", {"enabled": False}),
        "steps_per_print": 10**9,
    }


def warmup_steps(config: DPOConfig, total_steps: int) -> int:
    return config.warmup_steps if config.warmup_steps > 0 else math.ceil(config.warmup_ratio * total_steps)


def initialize_policy(model, ds_config: dict, config: DPOConfig, total_steps: int):
    """Wrap the policy in a DeepSpeed engine with transformers' LR scheduler."""
    import deepspeed
    from transformers import get_scheduler

    def scheduler(optimizer):
        return get_scheduler(config.lr_scheduler_type, optimizer,
                             num_warmup_steps=warmup_steps(config, total_steps), num_training_steps=total_steps)

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds_config, lr_scheduler=scheduler)
    return engine


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
