"""Precompute reference log-probs once, before training, with a pool of Ray actors holding the frozen
reference: a Ray Data `map_batches` stage over an actor pool that adds the ref_chosen_logps /
ref_rejected_logps columns. The actors batch rows with the training loop's own `collate` and score
them with its own `model_completion_logps`, so the numbers are the in-worker reference's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import pyarrow as pa
import ray
import torch

from raydpo import cluster, precision
from raydpo.config import DPOConfig
from raydpo.data.batching import collate
from raydpo.logprobs import model_completion_logps, shares_prompt_safely
from raydpo.model_loading import fit_to_model, load_model
from raydpo.reference import cache as ref_cache
from raydpo.reference.precomputed import REF_COLUMNS


class ReferenceLogps:
    """Ray Data callable class: one frozen reference per actor; a batch of tokenized rows in, the
    same rows with REF_COLUMNS out. Rows that already carry both values keep them."""

    def __init__(self, model_path: str, config: dict, pad_token_id: int, threads: Optional[int] = None):
        if threads:
            torch.set_num_threads(threads)
        self.pad_token_id = pad_token_id
        on_gpu = bool(config["use_gpu"]) and torch.cuda.is_available() and _given_a_gpu()
        self.config = precision.resolve(DPOConfig(**config), on_gpu)  # the training workers' compute dtype
        # Ray shows an actor only the GPU it was given, a fraction of one included (CUDA_VISIBLE_DEVICES),
        # so that GPU is cuda:0 here.
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        model = load_model(model_path, self.config).eval().requires_grad_(False)
        self.model = precision.place(model, self.device, precision.weights_dtype(self.config))
        self.config = fit_to_model(self.config, self.model)  # the layouts this model can run, as in the workers

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        todo = [i for i, row in enumerate(rows) if not has_reference_logps(row)]
        values = {c: [row.get(c) for row in rows] for c in REF_COLUMNS}
        for i, chosen, rejected in zip(todo, *self.score([rows[i] for i in todo])):
            values["ref_chosen_logps"][i], values["ref_rejected_logps"][i] = chosen, rejected
        for name in REF_COLUMNS:
            column = pa.array(values[name], type=pa.float64())
            if name in table.column_names:
                table = table.set_column(table.column_names.index(name), name, column)
            else:
                table = table.append_column(name, column)
        return table

    def score(self, rows: list) -> tuple:
        """(chosen, rejected) summed completion log-probs of the reference, one float per row."""
        if not rows:
            return [], []
        # the training loop's batch, LD-DPO weights included (collate's ld_alpha), so the numbers are the same
        batch = collate(rows, self.pad_token_id, self.config.max_length, self.config.truncation_mode,
                        self.config.share_prompt, ld_alpha=self.config.ld_alpha,
                        padding_free=self.config.padding_free).to(self.device)
        with torch.no_grad(), precision.autocast(self.config, self.device):  # as the workers compute
            chosen, rejected = model_completion_logps(self.model, batch).double().cpu().chunk(2)
        return chosen.tolist(), rejected.tolist()


def _given_a_gpu() -> bool:
    """Whether Ray gave this actor a GPU or a share of one. An actor asked for CPUs only (a user's
    precompute_ref_resources) may still see the node's GPUs, none of which is its to use."""
    return not ray.is_initialized() or bool(ray.get_gpu_ids())


def has_reference_logps(row: dict) -> bool:
    return all(row.get(c) is not None and not math.isnan(row[c]) for c in REF_COLUMNS)


def needs_precompute(dataset: "ray.data.Dataset") -> bool:
    """False when every row already carries both reference columns."""
    names = dataset.schema().names
    if not all(c in names for c in REF_COLUMNS):
        return True
    for batch in dataset.select_columns(list(REF_COLUMNS)).iter_batches(batch_format="numpy", batch_size=None):
        for c in REF_COLUMNS:
            column = np.asarray(batch[c], dtype=np.float64)
            if np.isnan(column).any():
                return True
    return False


def precompute_ref_logps(dataset: "ray.data.Dataset", model_path: str, config: DPOConfig,
                         pad_token_id: int) -> "ray.data.Dataset":
    """The materialized dataset with REF_COLUMNS, in the same row order (so shards match the
    in-worker run). Rows that already have both columns are not scored again, and a result cached
    in config.precompute_ref_cache_dir for the same reference, rows and settings is reused."""
    if not needs_precompute(dataset):
        return dataset
    key = ref_cache.cache_key(dataset, model_path, config) if config.precompute_ref_cache_dir else None
    cached = _load_cached(config.precompute_ref_cache_dir, key)
    if cached is not None:
        return cached
    result = _score(dataset, model_path, config, pad_token_id)
    if key:
        ref_cache.save(result, config.precompute_ref_cache_dir, key)
    return result


def cached_ref_logps(dataset: "ray.data.Dataset", model_path: str, config: DPOConfig):
    """The dataset with REF_COLUMNS from config.precompute_ref_cache_dir, or None when not cached."""
    key = ref_cache.cache_key(dataset, model_path, config) if config.precompute_ref_cache_dir else None
    return _load_cached(config.precompute_ref_cache_dir, key)


def _load_cached(cache_dir: Optional[str], key: Optional[str]):
    cached = ref_cache.load(cache_dir, key) if key else None
    if cached is not None:
        print(f"[raydpo] reference log-probs: cache hit, no reference forward ({cache_dir}/{key})", flush=True)
    return cached


def remote_args(resources: dict, use_gpu: bool) -> dict:
    """Ray options of one reference actor holding `resources` (sizing.size(...).actor): num_cpus,
    num_gpus, custom resources, and a CPU actor's malloc settings."""
    resources = dict(resources)
    args = {"num_cpus": resources.pop("CPU", 0), "num_gpus": resources.pop("GPU", 0)}
    if resources:
        args["resources"] = resources
    if not use_gpu and cluster.cpu_process_env():
        args["runtime_env"] = {"env_vars": cluster.cpu_process_env()}
    return args


def actor_threads(args: dict) -> Optional[int]:
    """torch threads of a CPU actor: the whole CPUs it holds (at least one)."""
    return max(1, int(args["num_cpus"])) if args["num_cpus"] else None


def _score(dataset: "ray.data.Dataset", model_path: str, config: DPOConfig, pad_token_id: int):
    args = remote_args(cluster.sizes(config).actor, config.use_gpu)
    context = ray.data.DataContext.get_current()
    preserve = context.execution_options.preserve_order
    context.execution_options.preserve_order = True  # row i keeps its index: the shards stay the same
    try:
        return dataset.map_batches(
            ReferenceLogps, batch_format="pyarrow",
            batch_size=config.precompute_ref_batch_size or config.per_device_train_batch_size,
            fn_constructor_kwargs={"model_path": model_path, "config": dataclasses.asdict(config),
                                   "pad_token_id": pad_token_id, "threads": actor_threads(args)},
            concurrency=config.precompute_ref_num_actors, **args).materialize()
    finally:
        context.execution_options.preserve_order = preserve
