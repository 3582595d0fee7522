"""A worker's rows as Arrow columns: what the training loop holds of its data shard for the whole run.

Each worker fetches its contiguous shard (shards.py) as Arrow blocks from the object store: token ids are
list<int32> columns (tokenize.TOKENIZED_SCHEMA), a flat int32 buffer plus offsets per block. `Shard`
keeps those blocks as they come, so the shard costs about 4 bytes per token, not the ~10 KB per pair
a Python dict with lists of ints per row costs. Only a micro-batch's rows become dicts (`take`), when
the batch is built, and are dropped with it.

Row access is by index because the loop's order is an index permutation per epoch
(batching.epoch_order): a resumed run skips exactly the rows it ran, whatever the layout of a batch.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raydpo.data.tokenize import REF_COLUMNS


class Shard:
    """Rows 0..len-1 of one worker's shard, stored as Arrow blocks; `take` builds a batch's row dicts.

    Arrow's own `Table.take` on a table of many blocks concatenates each column first (a copy of the
    whole shard per call), so a row is found by its block (a binary search over block starts) and
    sliced out of that block alone, zero-copy.
    """

    def __init__(self, blocks: Iterable[pa.Table]):
        self.blocks: List[pa.Table] = [block for block in blocks if block.num_rows]
        sizes = [block.num_rows for block in self.blocks]
        self.starts = np.cumsum([0] + sizes)  # block b holds rows starts[b]..starts[b+1]-1
        # Reference log-probs written after the shard was read (the streamed reference mode scores rows
        # as training reaches them): float64 per row, NaN where a row has none yet. Arrow columns are
        # immutable, so the values live here and take() lays them over the blocks' own.
        self.reference: Dict[str, np.ndarray] = {}

    @classmethod
    def from_rows(cls, rows: Sequence[dict]) -> "Shard":
        """A shard of Python rows (tests, and datasets handed over as lists): converted to Arrow once."""
        return cls([pa.Table.from_pylist(list(rows))] if rows else [])

    @classmethod
    def read(cls, source) -> "Shard":
        """Read a Ray Data Dataset or DataIterator (the driver's evaluation reads a whole dataset), block by block.

        batch_size=None yields whole blocks, as Arrow tables, without re-batching them; no row is
        turned into a Python object."""
        return cls(source.iter_batches(batch_size=None, batch_format="pyarrow"))

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def nbytes(self) -> int:
        """Bytes the shard's columns take (Arrow buffers and the written reference values)."""
        return sum(block.nbytes for block in self.blocks) + sum(a.nbytes for a in self.reference.values())

    def column_names(self) -> List[str]:
        return self.blocks[0].column_names if self.blocks else []

    def take(self, indices: Iterable[int]) -> List[dict]:
        """The rows at `indices`, in that order, as dicts of Python values (token ids as lists of ints)."""
        indices = [int(i) for i in indices]
        if any(i < 0 or i >= len(self) for i in indices):
            raise IndexError(f"row index out of range for a shard of {len(self)} rows: {indices}")
        blocks = np.searchsorted(self.starts, indices, side="right") - 1
        rows = [self.blocks[b].slice(i - int(self.starts[b]), 1).to_pylist()[0] for i, b in zip(indices, blocks)]
        for name, values in self.reference.items():
            for row, i in zip(rows, indices):
                if not np.isnan(values[i]):
                    row[name] = float(values[i])
        return rows

    def lengths(self, max_length: Optional[int]) -> np.ndarray:
        """Each row's padded length in a batch (group_by_length): prompt plus its longer completion,
        capped at max_length, computed on the Arrow offsets without reading a token."""
        def column(name):
            return np.concatenate([pc.list_value_length(block[name]).to_numpy() for block in self.blocks]
                                  ).astype(np.int64) if self.blocks else np.zeros(0, dtype=np.int64)

        longest = column("prompt_ids") + np.maximum(column("chosen_ids"), column("rejected_ids"))
        return np.minimum(longest, max_length) if max_length else longest

    def keep_reference(self, indices: Sequence[int], rows: Sequence[dict]) -> None:
        """Remember the reference columns these rows (taken at `indices`) now carry, so the next `take`
        of them returns the values without scoring the rows again."""
        for name in REF_COLUMNS:
            if name not in self.reference:
                self.reference[name] = self._column_values(name)
            for i, row in zip(indices, rows):
                if row.get(name) is not None:
                    self.reference[name][int(i)] = float(row[name])

    def _column_values(self, name: str) -> np.ndarray:
        """A float column as float64, NaN where a row has no value (or no such column)."""
        if name not in self.column_names():
            return np.full(len(self), np.nan)
        return np.concatenate([block[name].to_numpy(zero_copy_only=False).astype(np.float64)
                               for block in self.blocks])
