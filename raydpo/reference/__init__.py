"""Reference log-probs. Every implementation answers one question: `logps(batch) -> [2B]` summed
completion log-probs of the frozen reference, chosen rows first. The training loop does not know which:
it picks one at build time (train.loop.build_reference) and only uses the interface of `base.Reference`
(`logps`, and the `rows_ahead` / `before_eval` hooks that only the streamed mode fills in).

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

__all__ = ["Reference", "InWorkerReference", "PeftBaseReference", "PrecomputedReference", "StreamedReference"]
