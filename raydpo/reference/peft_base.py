"""PEFT: the reference lives inside the policy (no second model), as in TRL 1.16.

- a new adapter (peft_config): the base model, i.e. the policy with its adapters disabled;
- a saved adapter continued (an adapter folder, or a PeftModel shipped as one): a frozen copy of that
  adapter, loaded beside the trained one under the name "ref" (TRL's name) and switched to for the
  reference forward.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from raydpo.data.batching import Batch
from raydpo.logprobs import model_completion_logps
from raydpo.model_loading import is_peft_model
from raydpo.reference.base import Reference


class PeftBaseReference(Reference):
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
    def logps(self, batch: Batch) -> torch.Tensor:
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
