"""The one interface every reference mode has, so the training loop never asks which mode it holds."""

from __future__ import annotations

from typing import Iterable, Iterator, List

import torch

from raydpo.data.batching import Batch
from raydpo.data.shard import Shard


class Reference:
    """logps(batch): the frozen reference's [2B] summed completion log-probs, chosen rows first.

    Two hooks let a mode act before the rows reach a batch; both are plain pass-throughs here, and only
    the streamed mode (which has the rows scored by an actor pool) does more:
    - rows_ahead(rows, index_batches): the rows of each micro-batch in turn, taken from the shard;
    - before_eval(rows, batch_size): called before each evaluation with the eval shard.
    """

    def logps(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def rows_ahead(self, rows: Shard, index_batches: Iterable[list]) -> Iterator[List[dict]]:
        return (rows.take(indices) for indices in index_batches)

    def before_eval(self, rows: Shard, batch_size: int) -> None:
        pass
