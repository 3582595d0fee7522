"""How the tokenized dataset reaches the training workers: each worker's contiguous shard, as the object
refs of its Arrow blocks, handed over in the worker's spec (train/spec.py)."""

from __future__ import annotations

from typing import List

import ray


def contiguous_shards(dataset: "ray.data.Dataset", world_size: int) -> List[List[ray.ObjectRef]]:
    """Worker r's rows [r*N/W, (r+1)*N/W) of a materialized dataset: per worker, the object refs of its
    Arrow blocks, in row order (worker r reads them with `ray.get`, data/shard.py).

    Ray Train's default streaming_split hands rows out dynamically and, with equal=True, may drop a
    remainder; a fixed contiguous split keeps every row and gives a restarted worker the same rows. The
    split is made here, once per run, rather than through Ray Train's `datasets` argument and its
    DatasetManager actor (a new process, ~2-3 s of CPU, in every run's start-up; train/trainer.py's
    RunTrainer keeps Ray 2.60 from starting it anyway), only to hand each worker blocks that already sit
    in the object store."""
    num_rows = dataset.count()
    bounds = [num_rows * rank // world_size for rank in range(1, world_size)]
    parts = dataset.split_at_indices(bounds) if bounds else [dataset]
    return [part.to_arrow_refs() for part in parts]
