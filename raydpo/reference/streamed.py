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
from typing import Iterable, Iterator, List

import ray

from raydpo.config import DPOConfig
from raydpo.data.shard import Shard
from raydpo.reference.precompute import ReferenceLogps, actor_threads, has_reference_logps, remote_args
from raydpo.reference.precomputed import PrecomputedReference


def start_reference_pool(model_path: str, config: DPOConfig, pad_token_id: int) -> list:
    """precompute_ref_num_actors actors, each holding the frozen reference (precompute_ref_resources each)."""
    args = remote_args(config)
    actor = ray.remote(ReferenceLogps).options(**args)
    return [actor.remote(model_path, dataclasses.asdict(config), pad_token_id, actor_threads(args))
            for _ in range(config.precompute_ref_num_actors)]


def stop_reference_pool(actors: list) -> None:
    for actor in actors:
        ray.kill(actor)


def pool_cpus(config: DPOConfig) -> float:
    """CPUs the pool holds while training runs (the training workers' share leaves them free)."""
    return remote_args(config)["num_cpus"] * config.precompute_ref_num_actors if config.stream_ref_log_probs else 0.0


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
