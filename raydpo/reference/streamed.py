"""Streamed: the reference log-probs are computed while training runs, by a pool of Ray actors on their
own resources (the precompute actors' class, `ReferenceLogps`). Training starts at once and the
workers never hold the reference.

Each worker sends its next micro-batches to the pool a few batches ahead of the one it trains on, so
the reference forward overlaps the policy's forward and backward. A row's values are kept in the
shard (`Shard.keep_reference`), so later epochs and evaluations send nothing. The pool is shared by
all workers and lives on the driver's side: a restarted worker finds it still there.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Iterable, Iterator, List, Optional

import ray

from raydpo import cluster
from raydpo.config import DPOConfig
from raydpo.data.shard import Shard
from raydpo.reference.precompute import ReferenceLogps, actor_threads, has_reference_logps, remote_args
from raydpo.reference.precomputed import PrecomputedReference


def start_reference_pool(model_path: str, config: DPOConfig, pad_token_id: int, args: Optional[dict] = None) -> list:
    """precompute_ref_num_actors actors, each holding the frozen reference, with the Ray options `args`
    (precompute.remote_args; None: sized from the cluster)."""
    if args is None:
        args = remote_args(cluster.sizes(config).actor, config.use_gpu)
    actor = ray.remote(ReferenceLogps).options(**args)
    return [actor.remote(model_path, dataclasses.asdict(config), pad_token_id, actor_threads(args))
            for _ in range(config.precompute_ref_num_actors)]


def stop_reference_pool(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)


@ray.remote(num_cpus=0)
class ReferencePool:
    """Owns a streamed run's scoring actors, on the driver's side: a restarted worker finds them still there.

    On GPUs they start when the first training worker asks for them (`actors`), once all the workers hold
    their GPUs. Ray gives a fractional GPU request the fullest GPU that still fits it, so actors started
    first would crowd onto one GPU and leave too little of it for the worker meant to share it; started
    second, each fills what a worker left (sizing.py). On CPUs they start at once and load the reference
    while the workers start."""

    def __init__(self, model_path: str, config: dict, pad_token_id: int, args: dict):
        self.pool_args = (model_path, DPOConfig(**config), pad_token_id, args)
        self.pool = None if config["use_gpu"] else start_reference_pool(*self.pool_args)

    def actors(self) -> list:
        if self.pool is None:
            self.pool = start_reference_pool(*self.pool_args)
        return self.pool

    def stop(self) -> None:
        stop_reference_pool(self.pool or [])


def open_reference_pool(model_path: str, config: DPOConfig, pad_token_id: int, resources: dict):
    """The ReferencePool of a run whose actors each hold `resources` (stop it with close_reference_pool).
    Their Ray options are made here, so that a CPU actor's malloc setting follows the driver's environment."""
    return ReferencePool.options(scheduling_strategy=cluster.on_this_node()).remote(
        model_path, dataclasses.asdict(config), pad_token_id, remote_args(resources, config.use_gpu))


def close_reference_pool(pool) -> None:
    """Stop the scoring actors, then their owner (whose end alone would take them down too, a little later)."""
    if pool is None:
        return
    try:
        ray.get(pool.stop.remote(), timeout=60)
    except ray.exceptions.RayError:  # the owner is gone already, and its actors with it
        pass
    ray.kill(pool)


class StreamedReference(PrecomputedReference):
    """`logps(batch)` reads the columns like a precomputed reference; `rows_ahead` and `before_eval`
    fill them first."""

    def __init__(self, actors: list, prefetch_batches: int):
        self.actors = itertools.cycle(actors)
        self.num_actors = len(actors)
        self.prefetch_batches = prefetch_batches

    def rows_ahead(self, rows: Shard, index_batches: Iterable[list]) -> Iterator[List[dict]]:
        """Each micro-batch's rows, with the reference columns filled, keeping `prefetch_batches`
        batches in flight on the pool ahead of the one yielded."""
        return self._ahead(rows, index_batches, self.prefetch_batches)

    def before_eval(self, rows: Shard, batch_size: int) -> None:
        """Fill every row's columns (the eval rows: scored at the first evaluation only), a batch per
        actor in flight: only those batches' rows are Python dicts at a time."""
        chunks = (range(i, min(i + batch_size, len(rows))) for i in range(0, len(rows), batch_size))
        for _ in self._ahead(rows, chunks, max(0, self.num_actors - 1)):
            pass

    def _ahead(self, rows: Shard, index_batches: Iterable, depth: int) -> Iterator[List[dict]]:
        """Each batch's rows once scored, with `depth` batches sent to the pool ahead of the one yielded."""
        in_flight = collections.deque()
        for indices in index_batches:
            batch_rows = rows.take(indices)
            in_flight.append((rows, list(indices), batch_rows, self._submit(batch_rows)))
            if len(in_flight) > depth:
                yield self._receive(*in_flight.popleft())
        while in_flight:
            yield self._receive(*in_flight.popleft())

    def _submit(self, rows: List[dict]):
        todo = [row for row in rows if not has_reference_logps(row)]
        return todo, (next(self.actors).score.remote(todo) if todo else None)

    @staticmethod
    def _receive(shard: Shard, indices: list, rows: List[dict], pending) -> List[dict]:
        """The batch's rows with their scores, which the shard keeps for the next time it hands them out."""
        todo, scores = pending
        if scores is not None:
            for row, chosen, rejected in zip(todo, *ray.get(scores)):
                row["ref_chosen_logps"], row["ref_rejected_logps"] = chosen, rejected
            shard.keep_reference(indices, rows)
        return rows
