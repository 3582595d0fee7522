"""PEFT: the reference lives inside the policy (no second model), as in TRL 1.16.

- a new adapter (peft_config): the base model, i.e. the policy with its adapters disabled;
- a saved adapter continued (an adapter folder, or a PeftModel shipped as one): a frozen copy of that
  adapter, loaded beside the trained one under the name "ref" (TRL's name) and switched to for the
  reference forward.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Optional

import torch

from raydpo.logprobs import model_completion_logps

ADAPTER_CONFIG = "adapter_config.json"
REF_ADAPTER = "ref"  # the frozen copy of a continued adapter, as TRL names it


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
    """Where the frozen reference's weights are: ref_model, else the model itself (an adapter folder
    being continued is its own reference: that adapter, frozen, on its base; `train.loop.load_model`)."""
    return ref_model if ref_model is not None else model


def is_peft_model(module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(module, PeftModel)


def add_reference_adapter(peft_model, adapter_dir: str) -> None:
    """Load the adapter at `adapter_dir` a second time into `peft_model`, frozen, as REF_ADAPTER: the
    reference of a continued adapter (TRL copies its "default" adapter into "ref"; this loads the same
    weights from the folder the policy's adapter came from). Called before DeepSpeed wraps the model, so
    ZeRO-3 shards it like the rest and the optimizer never sees it (it does not require grad)."""
    device = next(peft_model.parameters()).device
    peft_model.load_adapter(adapter_dir, adapter_name=REF_ADAPTER, is_trainable=False, torch_device=str(device))


class PeftBaseReference:
    """Reference log-probs from the policy (a PeftModel, possibly inside a DeepSpeed engine, sharded
    under ZeRO-3) under no_grad: with `adapter_name` None every adapter disabled (exactly the frozen base
    model); else with that (frozen) adapter active instead of the trained one, as TRL's `use_adapter`."""

    def __init__(self, peft_model, adapter_name: Optional[str] = None):
        if not is_peft_model(peft_model):
            raise TypeError(f"PeftBaseReference needs a peft.PeftModel, got {type(peft_model).__name__}")
        if adapter_name is not None and adapter_name not in peft_model.peft_config:
            raise ValueError(f"the PEFT model has no adapter {adapter_name!r} (it has {list(peft_model.peft_config)})")
        self.model = peft_model
        self.adapter_name = adapter_name

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        with self._reference_weights():
            return model_completion_logps(self.model, batch)

    @contextlib.contextmanager
    def _reference_weights(self):
        if self.adapter_name is None:
            with self.model.disable_adapter():
                yield
            return
        trained = self.model.active_adapter
        # set_adapter also sets requires_grad (the active adapter's on, the others' off): inference_mode
        # keeps every adapter frozen meanwhile, and switching back restores the trained adapter's grads.
        self.model.set_adapter(self.adapter_name, inference_mode=True)
        try:
            yield
        finally:
            self.model.set_adapter(trained)
