"""A frozen reference model held by the training worker itself (and TR-DPO's updates to it)."""

from __future__ import annotations

import contextlib

import torch

from raydpo import precision
from raydpo.data.batching import Batch
from raydpo.logprobs import model_completion_logps
from raydpo.reference.base import Reference
from raydpo.train.deepspeed import reference_deepspeed_config, zero_stage


class InWorkerReference(Reference):
    """The reference on the policy's device and in its compute dtype: `device` is the engine's (a GPU
    worker's GPU), `dtype` the run's (precision.compute_dtype). Under ZeRO-3 DeepSpeed places, casts
    and shards it like the policy."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, device=None, dtype: torch.dtype = torch.float32):
        model.eval()
        model.requires_grad_(False)
        self.engine = None
        if zero_stage(ds_config) != 3:
            # from_pretrained leaves it on the CPU in float32; the batch is on the engine's device, and
            # under ZeRO 0-2 DeepSpeed casts only the policy it wraps
            precision.place(model, device, dtype)
        if zero_stage(ds_config) == 3:
            import deepspeed

            # Under ZeRO-3 the reference is sharded like the policy, so no worker holds a full copy.
            self.engine, *_ = deepspeed.initialize(model=model, config=reference_deepspeed_config(ds_config))
            self.engine.eval()
            model = self.engine.module
        self.model = model

    @torch.no_grad()
    def logps(self, batch: Batch) -> torch.Tensor:
        return model_completion_logps(self.model, batch)

    @torch.no_grad()
    def sync_from(self, policy: torch.nn.Module, alpha: float):
        """TR-DPO: reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter.

        Under ZeRO-3 each pair is gathered in turn (one parameter's full size at a time), mixed on
        rank 0 and re-sharded from there, as DeepSpeed requires for an in-place change."""
        for reference_param, policy_param in zip(self.model.parameters(), policy.parameters(), strict=True):
            with _gathered([reference_param, policy_param], self.engine is not None) as modify:
                if reference_param.shape != policy_param.shape:
                    raise ValueError("sync_ref_model needs the reference and the policy to share an architecture")
                if modify:
                    reference_param.data.mul_(1.0 - alpha).add_(policy_param.data.to(reference_param.dtype),
                                                                alpha=alpha)

    def state_dict(self, rank: int):
        """The full weights on rank 0 (gathered under ZeRO-3, where every worker must call this)."""
        if self.engine is not None:
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.model.state_dict() if rank == 0 else None


@contextlib.contextmanager
def _gathered(params: list, sharded: bool):
    """Full parameters inside the block; yields whether this worker applies the change."""
    if not sharded:
        yield True
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield deepspeed.comm.get_rank() == 0
