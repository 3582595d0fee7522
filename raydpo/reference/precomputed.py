"""Precomputed: the reference log-probs were computed before training (raydpo.reference.precompute)
and travel with each row as the ref_chosen_logps / ref_rejected_logps columns; collate puts them in
the batch as `Batch.ref_logps` ([2B], chosen first)."""

from __future__ import annotations

import torch

from raydpo.data.batching import Batch
from raydpo.data.tokenize import REF_COLUMNS  # noqa: F401  (the columns tokenize carries through)
from raydpo.reference.base import Reference


class PrecomputedReference(Reference):
    def logps(self, batch: Batch) -> torch.Tensor:
        if batch.ref_logps is None:
            raise KeyError("precompute_ref_log_probs=True but the batch carries no ref_logps: the rows have no "
                           f"{REF_COLUMNS} columns")
        # float32 like a float32 or bf16 reference's own log-probs (logprobs computes in >= float32)
        return batch.ref_logps.to(device=batch.input_ids.device, dtype=torch.float32)
