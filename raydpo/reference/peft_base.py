"""PEFT: the reference is the policy's own base model with its adapters disabled (no second copy)."""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from raydpo.logprobs import model_completion_logps

ADAPTER_CONFIG = "adapter_config.json"


def is_adapter_dir(path) -> bool:
    """A local PEFT adapter folder (what PeftModel.save_pretrained writes)."""
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def adapter_base(path: str) -> str:
    """The base model an adapter folder was trained on (its adapter_config's base_model_name_or_path)."""
    with open(os.path.join(path, ADAPTER_CONFIG)) as f:
        base = json.load(f).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base_model_name_or_path")
    return base


def reference_model_path(model: str, ref_model: Optional[str]) -> str:
    """Where the frozen reference's weights are: ref_model, else the adapter's base, else the model."""
    if ref_model is not None:
        return ref_model
    return adapter_base(model) if is_adapter_dir(model) else model


def is_peft_model(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


class PeftBaseReference:
    """Reference log-probs from the policy (a PeftModel, possibly inside a DeepSpeed engine, sharded
    under ZeRO-3) with every adapter disabled, under no_grad: exactly the frozen base model."""

    def __init__(self, peft_model):
        if not is_peft_model(peft_model):
            raise TypeError(f"PeftBaseReference needs a peft.PeftModel, got {type(peft_model).__name__}")
        self.model = peft_model

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        with self.model.disable_adapter():
            return model_completion_logps(self.model, batch)
