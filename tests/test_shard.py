"""A worker's shard (data/shard.py): Arrow columns, not a Python dict per row, and the same batches as
the rows it replaced."""

import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
import torch

from raydpo.data.batching import SHARED_PROMPT, PADDED, collate, epoch_order
from raydpo.data.shard import Shard
from raydpo.data.tokenize import TOKENIZED_SCHEMA


def pair_rows(count: int, start: int = 0, seed: int = 0) -> list:
    """Rows in the tokenized schema's types, of varied lengths, with precomputed reference log-probs."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(start, start + count):
        p, c, r = (int(n) for n in rng.integers(1, 40, 3))
        rows.append({"prompt_ids": rng.integers(3, 1000, p).tolist(), "chosen_ids": rng.integers(3, 1000, c).tolist(),
                     "rejected_ids": rng.integers(3, 1000, r).tolist(),
                     "ref_chosen_logps": -float(i) - 0.25, "ref_rejected_logps": -float(i) - 0.75})
    return rows


def blocks_of(rows: list, size: int) -> list:
    schema = pa.schema([TOKENIZED_SCHEMA.field(name) for name in rows[0]])
    return [pa.Table.from_pylist(rows[i:i + size], schema=schema) for i in range(0, len(rows), size)]


def assert_same_batch(a, b):
    assert a.layout == b.layout
    for name in ("input_ids", "attention_mask", "completion_mask", "position_ids", "gather_index", "side_input_ids",
                 "ref_logps", "logp_weights"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name
    assert (a.num_tokens, a.num_filled) == (b.num_tokens, b.num_filled)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_batches_from_the_shard_equal_batches_from_the_rows(share_prompt):
    """A shard over several blocks hands out the same rows, in the epoch order's index order, so every
    batch (shared-prompt or padded layout, precomputed reference log-probs, LD-DPO weights) is the one
    the list of row dicts gave."""
    rows = pair_rows(50)
    shard = Shard(blocks_of(rows, 7))  # 8 blocks, the last one short, as Ray Data's blocks come
    assert len(shard) == 50 and len(shard.blocks) == 8
    lengths = shard.lengths(32)
    assert lengths.tolist() == [min(32, len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])))
                                for r in rows]
    layouts = set()
    for indices in epoch_order(50, num_batches=13, batch_size=4, seed=3, epoch=1, lengths=lengths):
        taken = shard.take(indices)
        assert taken == [rows[i] for i in indices]
        expected = collate([rows[i] for i in indices], 0, 32, "keep_start", share_prompt, ld_alpha=0.5)
        batch = collate(taken, 0, 32, "keep_start", share_prompt, ld_alpha=0.5)
        assert_same_batch(batch, expected)
        assert batch.ref_logps is not None and batch.logp_weights is not None
        layouts.add(batch.layout)
    assert layouts == ({SHARED_PROMPT, PADDED} if share_prompt else {PADDED})  # a long prompt falls back


def test_vision_rows_keep_their_images_and_token_types():
    from raydpo.tasks import colour_image

    from raydpo.data.images import png_bytes

    image = png_bytes(colour_image("red"))
    rows = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8], "rejected_ids": [9, 10], "images": [image] * (i % 2),
             "prompt_token_types": [0, 1, 0] if i % 2 else [], "token_types_key": "mm_token_type_ids" if i % 2 else ""}
            for i in range(6)]
    shard = Shard(blocks_of(rows, 4))
    assert shard.take([5, 0, 3]) == [rows[5], rows[0], rows[3]]
    assert shard.take([1])[0]["images"][0] == image


def test_the_shard_holds_arrow_columns_not_python_rows():
    """Fails if the shard (or reading it, or an epoch of batches from it) turns the whole shard into
    Python objects: the Python heap it takes stays a small fraction of what the row dicts take, and its
    Arrow buffers scale with tokens (4 bytes each), not with Python objects per row."""
    rows = pair_rows(20_000)
    blocks = blocks_of(rows, 1000)
    tokens = sum(len(r[name]) for r in rows for name in ("prompt_ids", "chosen_ids", "rejected_ids"))
    del rows

    tracemalloc.start()
    dicts = blocks[0].to_pylist()  # the yardstick: one block's rows as Python dicts
    per_row_dicts = tracemalloc.get_traced_memory()[0] / len(dicts)
    del dicts
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    shard = Shard(iter(blocks))
    lengths = shard.lengths(None)
    for indices in epoch_order(len(shard), num_batches=len(shard) // 8, batch_size=8, seed=0, epoch=0,
                               lengths=lengths)[:200]:
        shard.take(indices)
    shard.keep_reference([0, 1], [{"ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}] * 2)
    python_heap = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()

    dict_bytes = per_row_dicts * len(shard)
    # The epoch order itself (torch.randperm(...).tolist() and the batches, a list of ints per row) is
    # the one per-row Python structure, as before; the rows' tokens never are.
    assert python_heap < 0.1 * dict_bytes, (python_heap, dict_bytes)
    # list<int32>: 4 bytes a token, offsets (4 bytes a list) and the float64 reference columns per row
    arrow = sum(block.nbytes for block in shard.blocks)
    assert 4 * tokens <= arrow <= 4 * tokens + 40 * len(shard)
    assert shard.nbytes == arrow + 2 * 8 * len(shard)  # + the kept reference values, float64 per row
    assert shard.take([1])[0]["ref_chosen_logps"] == -1.0 and shard.take([2])[0]["ref_chosen_logps"] == -2.25


def test_kept_reference_values_overlay_missing_ones():
    rows = pair_rows(5)
    for row in rows[2:]:
        row["ref_chosen_logps"] = row["ref_rejected_logps"] = None  # a column with nulls, as tokenize keeps it
    shard = Shard(blocks_of(rows, 2))
    assert shard.take([3])[0]["ref_chosen_logps"] is None
    shard.keep_reference([3], [{"ref_chosen_logps": -7.0, "ref_rejected_logps": -8.0}])
    taken = shard.take([0, 3, 4])
    assert [(r["ref_chosen_logps"], r["ref_rejected_logps"]) for r in taken] == [(-0.25, -0.75), (-7.0, -8.0),
                                                                                  (None, None)]
    with pytest.raises(IndexError):
        shard.take([5])
    assert len(Shard([])) == 0 and not Shard.from_rows([])


def test_a_ray_data_iterator_reads_into_the_same_rows(ray_session):
    """What a worker reads (a DataIterator over Ray Data blocks) are the rows iter_rows gave, in order."""
    import ray

    rows = pair_rows(30)
    rows[4]["ref_chosen_logps"] = rows[4]["ref_rejected_logps"] = None
    ds = ray.data.from_arrow(blocks_of(rows, 8)).materialize()
    shard = Shard.read(ds.iterator())
    assert len(shard) == 30 and len(shard.blocks) == 4
    old = [{name: (value.tolist() if isinstance(value, np.ndarray) else value) for name, value in row.items()}
           for row in ds.iter_rows()]
    taken = shard.take(range(30))
    assert taken == rows
    for new, before in zip(taken, old):  # the old path's numbers (NaN for a null float) are the same
        assert new["prompt_ids"] == before["prompt_ids"] and new["rejected_ids"] == before["rejected_ids"]
        assert new["ref_chosen_logps"] == before["ref_chosen_logps"] or np.isnan(before["ref_chosen_logps"])


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_contiguous_shards_give_each_worker_its_rows_in_order(ray_session, world_size):
    """Worker r reads rows [r*N/W, (r+1)*N/W) from its block refs: every row once, in order, the
    remainder spread as N*r//W spreads it, and blocks cut where a split falls inside one."""
    import ray

    from raydpo.data.shards import contiguous_shards

    rows = pair_rows(31)
    ds = ray.data.from_arrow(blocks_of(rows, 8)).materialize()  # blocks of 8: 8, 8, 8, 7 rows
    shards = contiguous_shards(ds, world_size)
    assert len(shards) == world_size
    read = 0
    for rank, refs in enumerate(shards):
        shard = Shard(ray.get(refs))  # what the worker of that rank does (run_context.shard)
        assert shard.take(range(len(shard))) == rows[31 * rank // world_size:31 * (rank + 1) // world_size], rank
        read += len(shard)
    assert read == 31
