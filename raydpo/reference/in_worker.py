"""A frozen reference model held by the training worker itself."""

from __future__ import annotations

import torch

from raydpo.logprobs import model_completion_logps
from raydpo.train.deepspeed import reference_deepspeed_config, zero_stage


class InWorkerReference:
    def __init__(self, model: torch.nn.Module, ds_config: dict):
        model.eval()
        model.requires_grad_(False)
        if zero_stage(ds_config) == 3:
            import deepspeed

            # Under ZeRO-3 the reference is sharded like the policy, so no worker holds a full copy.
            engine, *_ = deepspeed.initialize(model=model, config=reference_deepspeed_config(ds_config))
            engine.eval()
            model = engine.module
        self.model = model

    @torch.no_grad()
    def logps(self, batch: dict) -> torch.Tensor:
        return model_completion_logps(self.model, batch)
