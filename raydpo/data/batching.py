"""Per-worker batches: a deterministic order per epoch, and padding into model inputs.

Pure functions of (rows, seed, epoch): a restarted worker rebuilds exactly the same batches, so a
resumed run neither repeats nor skips one.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch


def micro_batches_per_epoch(num_rows: int, world_size: int, batch_size: int, accumulation: int) -> int:
    """Micro-batches each worker runs per epoch: enough for its largest shard, rounded up to whole
    optimizer steps (the extra slots repeat rows of the shard rather than drop any)."""
    largest_shard = math.ceil(num_rows / world_size)
    batches = math.ceil(largest_shard / batch_size)
    return math.ceil(batches / accumulation) * accumulation


GROUP_SPAN = 50  # batches per length-sorted group: wide enough to match lengths, narrow enough to stay random


def epoch_order(shard_size: int, num_batches: int, batch_size: int, seed: int, epoch: int,
                lengths: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Row indices of each micro-batch for one epoch: a seeded shuffle, wrapped around to fill the
    last batches (like torch's DistributedSampler pads by repeating rows).

    With `lengths` (group_by_length), each run of GROUP_SPAN batches of the shuffle is sorted by
    length before it is cut into batches, and the batches are then shuffled: rows of similar length
    share a batch, so little compute goes to padding (transformers' LengthGroupedSampler idea)."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(shard_size, generator=generator).tolist()
    needed = num_batches * batch_size
    order = (order * math.ceil(needed / shard_size))[:needed]
    if lengths is not None:
        span = GROUP_SPAN * batch_size
        order = [i for start in range(0, needed, span)
                 for i in sorted(order[start:start + span], key=lambda i: -lengths[i])]
    batches = [order[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]
    if lengths is not None:
        batches = [batches[i] for i in torch.randperm(num_batches, generator=generator).tolist()]
    return batches


def row_length(row: dict, max_length: Optional[int]) -> int:
    """Padded length a row asks of its batch: its longer side, truncated."""
    longest = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
    return min(longest, max_length) if max_length else longest


def truncate(tokens: list, max_length: Optional[int], truncation_mode: str) -> list:
    """TRL's per-sequence truncation: keep_start drops from the right, keep_end from the left."""
    if max_length is None or len(tokens) <= max_length:
        return tokens
    return tokens[:max_length] if truncation_mode == "keep_start" else tokens[-max_length:]


def collate(rows: Sequence[dict], pad_token_id: int, max_length: Optional[int] = None,
            truncation_mode: str = "keep_start") -> dict:
    """Pad prompt+chosen and prompt+rejected into one [2B, T] batch (chosen first), right-padded,
    each sequence truncated on its own.

    completion_mask is 1 on completion tokens only: prompt and padding never enter the log-probs.
    Rows with ref_chosen_logps / ref_rejected_logps add `ref_logps` [2B] (chosen first).
    """
    sequences, completion_masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for row in rows:
            prompt, completion = list(row["prompt_ids"]), list(row[side])
            sequences.append(truncate(prompt + completion, max_length, truncation_mode))
            completion_masks.append(truncate([0] * len(prompt) + [1] * len(completion), max_length, truncation_mode))
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, (seq, mask) in enumerate(zip(sequences, completion_masks)):
        input_ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[i, : len(seq)] = 1
        completion_mask[i, : len(seq)] = torch.tensor(mask, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    # Precomputed reference log-probs (raydpo.reference.precompute) ride along, chosen first like the rows.
    if rows and all(row.get("ref_chosen_logps") is not None and row.get("ref_rejected_logps") is not None
                    for row in rows):
        batch["ref_logps"] = torch.tensor([float(row["ref_chosen_logps"]) for row in rows]
                                          + [float(row["ref_rejected_logps"]) for row in rows], dtype=torch.float64)
    return batch
