"""DeepSpeed glue: the engine config built from DPOConfig, and the engines for policy and reference."""

from __future__ import annotations

import copy
import sys
import types

from raydpo import precision
from raydpo.config import DPOConfig
from raydpo.train.schedule import warmup_steps


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
    precision.fill_deepspeed(ds, config)  # a resolved config (precision.resolve): bf16 is True or False
    zero = ds.setdefault("zero_optimization", {})
    _fill(zero, "stage", config.zero_stage if config.zero_stage is not None else (0 if world_size == 1 else 2))
    if deepspeed_builds_optimizer(ds, config):
        _fill_optimizer_section(ds, config)
    else:
        # raydpo builds config.optim as transformers' Trainer does; like Trainer, it tells ZeRO that an
        # optimizer other than its Adam variants is fine, and lets it run where ZeRO-Offload puts the states.
        ds.setdefault("zero_allow_untested_optimizer", True)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)  # raydpo prints its own progress lines
    return ds


def deepspeed_builds_optimizer(ds: dict, config: DPOConfig) -> bool:
    """The rule (as transformers' Trainer): a DeepSpeed config with an "optimizer" section gets that
    optimizer and `optim` is ignored; otherwise raydpo builds `optim`. One exception keeps ZeRO-Offload
    fast: with the optimizer offloaded, the AdamW family is DeepSpeed's CPU Adam (the same update)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return "optimizer" in ds or (offload != "none" and config.optim.startswith("adamw"))


def _fill_optimizer_section(ds: dict, config: DPOConfig):
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


def reference_deepspeed_config(train_config: dict) -> dict:
    """For a frozen reference under ZeRO-3: shard it the same way, with no optimizer."""
    return {
        "train_micro_batch_size_per_gpu": train_config["train_micro_batch_size_per_gpu"],
        "train_batch_size": train_config["train_batch_size"],
        "gradient_accumulation_steps": train_config["gradient_accumulation_steps"],
        "zero_optimization": {"stage": 3},
        "bf16": train_config["bf16"],
        "fp16": train_config["fp16"],
        **({"torch_autocast": train_config["torch_autocast"]} if "torch_autocast" in train_config else {}),
        "steps_per_print": 10**9,
    }


def param_groups(model, weight_decay=None) -> list:
    """transformers' Trainer groups: biases and LayerNorm/RMSNorm weights get no weight decay. With
    weight_decay None the decayed group takes the optimizer's own (a DeepSpeed "optimizer" section's)."""
    from transformers import Trainer

    decayed = set(Trainer.get_decay_parameter_names(None, model))  # a Trainer method that ignores self
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    decay = {"params": [p for name, p in named if name in decayed]}
    if weight_decay is not None:
        decay["weight_decay"] = weight_decay
    return [decay, {"params": [p for name, p in named if name not in decayed], "weight_decay": 0.0}]


def build_optimizer(config: DPOConfig, groups: list):
    """config.optim over these groups, with the class and arguments transformers' Trainer picks."""
    from transformers import Trainer
    from transformers.training_args import OptimizerNames

    args = types.SimpleNamespace(optim=OptimizerNames(config.optim), optim_args=None, learning_rate=config.learning_rate,
                                 adam_beta1=config.adam_beta1, adam_beta2=config.adam_beta2,
                                 adam_epsilon=config.adam_epsilon)
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return optimizer_cls(groups, **kwargs)


def build_lr_scheduler(config: DPOConfig, optimizer, total_steps: int):
    """transformers' get_scheduler, as Trainer.create_scheduler calls it; a bad lr_scheduler_kwargs is named."""
    from transformers import get_scheduler

    try:
        return get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(config, total_steps),
                             num_training_steps=total_steps, scheduler_specific_kwargs=config.lr_scheduler_kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"DPOConfig.lr_scheduler_kwargs {config.lr_scheduler_kwargs!r} do not fit "
                         f"lr_scheduler_type {config.lr_scheduler_type!r}: {error}") from error


def check_lr_scheduler(config: DPOConfig, total_steps: int):
    """Build the schedule once on the driver, so a bad lr_scheduler_kwargs fails before any worker starts."""
    import torch

    build_lr_scheduler(config, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=config.learning_rate),
                       total_steps)


def import_deepspeed():
    """`import deepspeed`, without two costs a training worker never uses (measured by bench/startup.py):

    - deepspeed.autotuning imports mlflow when it is installed, ~1.5 s per process; its autotuner is the
      only user, and raydpo never runs it. mlflow is hidden for that one import unless already loaded.
    - On the CPU accelerator, DeepSpeed's communication backend loads a shared-memory all-reduce
      extension (`deepspeed_shm_comm`): a ~45 s C++ build on a machine that has not built it yet, 1-2 s
      to load after that, and a "built successfully" line in every run's output. Only
      `inference_all_reduce` (DeepSpeed's inference engine) uses it; training's all-reduce is
      torch.distributed's. Marked incompatible here, DeepSpeed skips it (comm/torch.py: build_shm_op)."""
    hide_mlflow = "mlflow" not in sys.modules
    if hide_mlflow:
        sys.modules["mlflow"] = None  # `import mlflow` raises ImportError inside deepspeed.autotuning
    try:
        import deepspeed
    finally:
        if hide_mlflow and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def initialize_policy(model, ds_config: dict, config: DPOConfig, total_steps: int):
    """Wrap the policy in a DeepSpeed engine with transformers' optimizer, parameter groups and LR scheduler."""
    deepspeed = import_deepspeed()

    if "optimizer" in ds_config:  # DeepSpeed builds it (deepspeed_builds_optimizer), over Trainer's groups
        groups, optimizer = param_groups(model), None
    else:
        groups = param_groups(model, config.weight_decay)
        optimizer = build_optimizer(config, groups)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer, config=ds_config,
                                           lr_scheduler=lambda opt: build_lr_scheduler(config, opt, total_steps))
    return engine


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))
