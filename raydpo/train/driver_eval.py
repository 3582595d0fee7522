"""`DPOTrainer.evaluate()`: DPO metrics of a policy on an eval set, in the driver's process, with the
training workers' own batch, loss and metric code (`step.evaluate`, `step.dpo_step`)."""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

from raydpo import precision
from raydpo.config import DPOConfig
from raydpo.data.images import text_tokenizer
from raydpo.data.shard import Shard
from raydpo.model_loading import continued_adapter, fit_to_model, load_policy
from raydpo.reference import model_reference
from raydpo.train import checkpoint
from raydpo.train.checkpoint import MODEL_DIR
from raydpo.train.step import evaluate


def evaluate_policy(config: DPOConfig, model: str, ref_model: Optional[str], peft_config, processing_class, data,
                    checkpoint_dir: Optional[str] = None) -> dict:
    """eval_<metric> of the checkpoint's policy (its model/ folder), or without one of the initial policy
    (`model`, with a fresh adapter under peft_config), against the run's reference: ref_model, else with
    PEFT the continued adapter's frozen copy or the base with adapters disabled, else the initial model
    (TR-DPO: the checkpoint's moved reference)."""
    reference_adapter = continued_adapter(model, ref_model)  # the adapter `model` as it was before training
    if checkpoint_dir is not None:
        policy = load_policy(os.path.join(checkpoint_dir, MODEL_DIR), config, reference_adapter=reference_adapter)
    else:
        policy = load_policy(model, config, peft_config, reference_adapter)
    device = torch.device("cuda") if config.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    config = precision.resolve(config, on_gpu=device.type == "cuda")  # the training workers' compute dtype
    dtype = precision.weights_dtype(config)
    precision.place(policy, device, dtype)
    path = checkpoint.reference_path(model, ref_model, config, checkpoint_dir)
    reference = model_reference(policy, ref_model, path, config, {}, device, dtype)
    config = fit_to_model(config, policy)
    rows = Shard.read(data.dataset)
    num_batches = math.ceil(len(rows) / config.per_device_eval_batch_size)
    return evaluate(policy, reference, rows, num_batches, config, processing_class,
                    text_tokenizer(processing_class).pad_token_id)
