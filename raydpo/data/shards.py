"""How the tokenized dataset reaches the Ray Train workers."""

from __future__ import annotations

import ray.train


class ContiguousShards(ray.train.DataConfig):
    """Worker r gets rows [r*N/W, (r+1)*N/W) of each (materialized) dataset.

    Ray Train's default streaming_split hands rows out dynamically and, with equal=True, may drop a
    remainder; a fixed contiguous split keeps every row and gives a restarted worker the same rows.
    """

    def configure(self, datasets, world_size, worker_handles=None, worker_node_ids=None, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, ds in datasets.items():
            num_rows = ds.count()
            bounds = [num_rows * rank // world_size for rank in range(1, world_size)]
            parts = ds.split_at_indices(bounds) if bounds else [ds]
            for rank, part in enumerate(parts):
                # A progress bar per worker and dataset would flood the run's output for a read that is
                # over in moments. This runs in Ray Train's controller process, so only its copies change.
                part.context.enable_progress_bars = False
                output[rank][name] = part.iterator()
        return output
