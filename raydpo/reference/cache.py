"""On-disk cache of precomputed reference log-probs: the reference forward is paid once per
(reference model, tokenized data, settings that change the log-probs), across runs and sweep trials.

An entry is the tokenized dataset with its REF_COLUMNS, stored like a tokenized-dataset entry
(raydpo.data.cache: parquet parts in row order, written to a temporary folder and renamed into
place). The key hashes:
- the tokenized rows themselves (token ids, so the source data and the tokenizer are both covered);
- the reference model: its path and, for a local folder, each file's name, size and mtime;
- max_length, truncation_mode, ld_alpha, model_init_kwargs and the precision settings (they change
  the log-probs).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray

from raydpo import storage
from raydpo.config import DPOConfig
from raydpo.data import cache as dataset_cache

VERSION = 3  # bump when the log-prob computation changes (2: bf16/fp16 references keep float32 buffers;
#              3: bf16 is float32 weights under autocast)


def cache_key(dataset: "ray.data.Dataset", model_path: str, config: DPOConfig) -> str:
    parts = [VERSION, _rows_digest(dataset), _model_id(model_path),
             [config.max_length, config.truncation_mode, config.ld_alpha, config.model_init_kwargs],
             # the actors' compute dtype follows from these (precision.resolve), and bf16 log-probs differ
             [config.bf16, config.fp16, config.deepspeed_enabled("bf16"), config.use_gpu]]
    return "ref-" + hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def load(cache_dir: str, key: str) -> Optional["ray.data.Dataset"]:
    return dataset_cache.load(cache_dir, key)


def save(dataset: "ray.data.Dataset", cache_dir: str, key: str) -> None:
    dataset_cache.save(dataset, cache_dir, key)


def clear(cache_dir: str) -> int:
    """Delete every cached reference entry in cache_dir (a local folder or a URI); returns how many were removed."""
    fs, path = storage.resolve(cache_dir if storage.is_uri(cache_dir) else os.path.expanduser(cache_dir))
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return 0
    entries = [info.path for info in fs.get_file_info(pafs.FileSelector(path))
               if info.type == pafs.FileType.Directory and info.base_name.startswith("ref-")]
    for entry in entries:
        fs.delete_dir(entry)
    return len(entries)


def _model_id(path: str):
    if not os.path.isdir(path):
        return path  # a hub id: its name is all there is without a download
    files = sorted((name, os.stat(os.path.join(path, name)).st_size, os.stat(os.path.join(path, name)).st_mtime_ns)
                   for name in os.listdir(path) if os.path.isfile(os.path.join(path, name)))
    return [os.path.abspath(path), files]


def _rows_digest(dataset: "ray.data.Dataset") -> str:
    """A digest of every column's values in row order, independent of how rows are split in blocks."""
    hashes = {}
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
        for name in sorted(batch.column_names):
            column = batch.column(name).combine_chunks()
            digest = hashes.setdefault(name, hashlib.sha256())
            if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
                offsets = np.asarray(column.offsets, dtype=np.int64)
                digest.update(np.diff(offsets).tobytes())  # the row lengths
                digest.update(np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
            else:
                digest.update(json.dumps(column.to_pylist(), default=str).encode())
    return hashlib.sha256("".join(f"{n}:{h.hexdigest()}" for n, h in sorted(hashes.items())).encode()).hexdigest()
