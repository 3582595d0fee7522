"""What crosses the Ray boundary into a training worker, as typed values: the worker's spec (built by
trainer.fit on the driver), the training plan, and the resume state a checkpoint carries."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from raydpo.config import DPOConfig
from raydpo.data.batching import micro_batches_per_epoch


@dataclass(frozen=True)
class TrainingPlan:
    """How many micro-batches and optimizer steps the run has; the same on every worker."""

    micro_batches_per_epoch: int  # per worker: its largest shard's batches, rounded up to whole steps
    steps_per_epoch: int
    total_steps: int  # max_steps, else num_train_epochs whole or partial epochs
    eval_batches: int  # eval forwards per worker per evaluation (the largest eval shard's); 0: no eval set


def training_plan(num_rows: int, config: DPOConfig, num_eval_rows: int = 0) -> TrainingPlan:
    micro_batches = micro_batches_per_epoch(num_rows, config.world_size, config.per_device_train_batch_size,
                                            config.gradient_accumulation_steps)
    steps_per_epoch = micro_batches // config.gradient_accumulation_steps
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    # every worker runs as many eval forwards as the largest eval shard needs
    eval_batches = micro_batches_per_epoch(num_eval_rows, config.world_size, config.per_device_eval_batch_size, 1)
    return TrainingPlan(micro_batches, steps_per_epoch, total, eval_batches)


@dataclass
class WorkerSpec:
    """Everything a training worker is given (Ray Train's train_loop_config is {"spec": its object ref})."""

    config: dict  # DPOConfig.to_dict(): rebuilt (and checked again) in the worker
    plan: TrainingPlan
    model: str  # the policy's path (or an adapter folder to continue)
    ref_model: Optional[str]  # None with PEFT: the reference is inside the policy
    tokenizer: Any  # the processing class: saved with each checkpoint; a processor's image processor batches images
    pad_token_id: int
    # {"train", "eval" (with an eval set)}: per worker rank, the object refs of its contiguous shard's Arrow
    # blocks (data/shards.py)
    shards: dict = field(default_factory=dict)
    history: Any = None  # the MetricsHistory actor's handle
    peft_config: Any = None
    resume_from_checkpoint: Optional[str] = None
    reference_pool: Any = None  # stream_ref_log_probs: the ReferencePool actor (reference/streamed.py)
    driver_events: bool = False  # rank 0 also sends ("save", step) events (TrainerCallbacks on the driver)
    wait_for_driver: bool = False  # the workers wait at each logged or saved step to honour should_training_stop

    def dpo_config(self) -> DPOConfig:
        return DPOConfig(**self.config)


@dataclass
class ResumeState:
    """Where a checkpoint left the loop. On disk it is DeepSpeed's client_state, a dict with these keys."""

    global_step: int = 0
    num_tokens: float = 0.0  # tokens trained on so far (the logged num_tokens counter)
    early_stopping: dict = field(default_factory=dict)  # schedule.EarlyStopping.state()

    def client_state(self) -> dict:
        return {"global_step": self.global_step, "num_tokens": self.num_tokens, "early_stopping": self.early_stopping}

    @classmethod
    def from_client_state(cls, state: dict) -> "ResumeState":
        return cls(state["global_step"], state["num_tokens"], state.get("early_stopping") or {})
