"""Reference log-probs. Every implementation answers one question: `logps(batch) -> [2B]` summed
completion log-probs of the frozen reference, chosen rows first. The training loop does not know which:
it picks one at build time (train.loop.build_reference; `model_reference` below when the reference is a
model, shared with DPOTrainer.evaluate()) and only uses the interface of `base.Reference` (`logps`, and
the `rows_ahead` / `before_eval` hooks that only the streamed mode fills in).

- InWorkerReference: a separate frozen model in the worker (sharded under ZeRO-3);
- PeftBaseReference: the PEFT policy with its adapters disabled, or with a continued adapter's frozen
  copy active (no second model);
- PrecomputedReference: columns computed before training by an actor pool (reference.precompute);
- StreamedReference: the same columns, computed by the pool while training runs (reference.streamed).
"""

from raydpo.reference.base import Reference
from raydpo.reference.in_worker import InWorkerReference
from raydpo.reference.peft_base import PeftBaseReference
from raydpo.reference.precomputed import PrecomputedReference
from raydpo.reference.streamed import StreamedReference



def model_reference(policy, ref_model, reference_path: str, config, ds_config: dict, device, dtype) -> Reference:
    """The reference when it is a model beside the policy. Without a `ref_model` a PEFT policy is its own
    reference: the continued adapter's frozen copy (REF_ADAPTER, TRL's) when it has one, else the base with
    adapters disabled, with no second model. Otherwise the model at `reference_path` (the initial model,
    ref_model, or TR-DPO's moved reference of a checkpoint), in the policy's compute dtype."""
    from raydpo.model_loading import REF_ADAPTER, is_peft_model, load_model

    if ref_model is None and is_peft_model(policy):
        return PeftBaseReference(policy, REF_ADAPTER if REF_ADAPTER in policy.peft_config else None)
    return InWorkerReference(load_model(reference_path, config), ds_config, device, dtype)


__all__ = ["model_reference", "Reference", "InWorkerReference", "PeftBaseReference", "PrecomputedReference",
           "StreamedReference"]
