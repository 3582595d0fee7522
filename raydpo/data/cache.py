"""On-disk cache of tokenized datasets, so repeated runs and every trial of a sweep tokenize once.

An entry is `<cache_dir>/<key>/part-NNNNN.parquet` (in row order) plus `meta.json`, written to a
temporary folder and renamed into place, so a concurrent writer or a crash never leaves a partial
entry. The key hashes the source data, the split, the user's map_fn, the tokenizer and this
module's format version. Source data is identified by each file's path, size and modification
time; in-memory lists by their content; `datasets` datasets by their fingerprint. A Ray Dataset is
keyed only when `to_ray_dataset` built it. The cache folder is local, a shared mount or a URI (s3://...;
raydpo.storage); it is read and written on the driver only.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import posixpath  # pyarrow.fs paths: '/' on every filesystem
import shutil
import uuid
from typing import Any, Callable, Optional

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from raydpo import storage

from raydpo.data.sources import data_files, is_saved_dataset, jsonable, origin
from raydpo.data.images import is_processor, text_tokenizer

logger = logging.getLogger(__name__)

VERSION = 3  # bump when the tokenized schema or the tokenization rules change


def cache_key(source: Any, tokenizer, split: Optional[str] = None, map_fn: Optional[Callable] = None) -> Optional[str]:
    """A hex key for (source data, split, map_fn, tokenizer), or None when the source can't be keyed."""
    if isinstance(source, ray.data.Dataset):
        if origin(source) is None:
            return None
        source, split, map_fn = origin(source)
    parts = [_source_id(source, split), _function_id(map_fn), tokenizer_id(tokenizer), VERSION]
    if any(part is None for part in parts):
        return None
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def tokenizer_id(tokenizer) -> str:
    """Everything about a tokenizer that changes its tokens: the full fast-tokenizer pipeline (BOS/EOS
    post-processing included) or the vocabulary, the special tokens and the chat template (and for a
    processor, its image processor's settings too)."""
    if is_processor(tokenizer):  # a processor: its tokenizer, its image processor and its own template
        return hashlib.sha256(json.dumps([tokenizer_id(text_tokenizer(tokenizer)), tokenizer.image_processor.to_dict(),
                                          getattr(tokenizer, "chat_template", None)], sort_keys=True,
                                         default=str).encode()).hexdigest()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = {
        "class": type(tokenizer).__name__,
        "pipeline": backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def load(cache_dir: str, key: str) -> Optional["ray.data.Dataset"]:
    """The entry's rows, read here on the driver and handed to Ray as in-memory blocks: a Ray Data read
    task could run on a node that sees neither a local cache folder nor the driver's credentials."""
    fs, entry = storage.resolve(storage.join(_expand(cache_dir), key))
    if fs.get_file_info(posixpath.join(entry, "meta.json")).type != pafs.FileType.File:
        return None
    parts = sorted(info.path for info in fs.get_file_info(pafs.FileSelector(entry))
                   if info.path.endswith(".parquet"))
    if not parts:
        return None
    logger.info("tokenized dataset: cache hit %s", entry)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    return ray.data.from_arrow([pq.read_table(part, filesystem=fs) for part in parts]).materialize()


def save(ds: "ray.data.Dataset", cache_dir: str, key: str) -> None:
    """Write `ds` (in row order) as one cache entry; a finished entry from a concurrent writer wins.

    A local entry is written to a temporary folder and renamed into place. An object store (a URI) has
    no folder rename: the parts go straight into the entry and meta.json, which `load` looks for, is
    written last, so a crash leaves no entry that loads (two writers of one key write the same rows)."""
    cache_dir = _expand(cache_dir)
    fs, entry = storage.resolve(storage.join(cache_dir, key))
    local = isinstance(fs, pafs.LocalFileSystem)
    target = os.path.join(cache_dir, f".tmp-{key}-{uuid.uuid4().hex[:8]}") if local else entry
    fs.create_dir(target)
    try:
        rows = 0
        # Written from the driver, block by block, so part order is row order.
        for i, batch in enumerate(ds.iter_batches(batch_format="pyarrow", batch_size=None)):
            pq.write_table(batch, posixpath.join(target, f"part-{i:05d}.parquet"), filesystem=fs)
            rows += batch.num_rows
        with fs.open_output_stream(posixpath.join(target, "meta.json")) as f:
            f.write(json.dumps({"rows": rows, "version": VERSION}).encode())
        if local:
            os.rename(target, entry)
        logger.info("tokenized dataset: cached %d rows in %s", rows, entry)
    except OSError:
        if fs.get_file_info(posixpath.join(entry, "meta.json")).type != pafs.FileType.File:
            raise
    finally:
        if local:
            shutil.rmtree(target, ignore_errors=True)


def _expand(cache_dir: str) -> str:
    return cache_dir if storage.is_uri(cache_dir) else os.path.abspath(os.path.expanduser(cache_dir))


def _source_id(source: Any, split: Optional[str]):
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if isinstance(source, (list, tuple)) and source and all(isinstance(s, (str, os.PathLike)) for s in source):
        if len(source) == 1 and is_saved_dataset(os.fspath(source[0])):
            paths = sorted(os.path.join(root, n) for root, _, names in os.walk(os.fspath(source[0])) for n in names)
        else:
            paths = data_files(list(source))
        return ["files", split, [[os.path.abspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in paths]]
    if isinstance(source, list):
        try:
            text = json.dumps(source, sort_keys=True, default=jsonable)
        except (TypeError, ValueError):
            return None
        return ["rows", hashlib.sha256(text.encode()).hexdigest()]
    if hasattr(source, "keys") and not isinstance(source, dict):  # a datasets.DatasetDict: the split used
        source = source[split or "train"] if (split or "train") in source.keys() else None
    fingerprint = getattr(source, "_fingerprint", None)  # datasets.Dataset
    return ["datasets", fingerprint] if fingerprint else None


def _function_id(fn: Optional[Callable]):
    """A map_fn is identified by its source code (its bytecode when there is none)."""
    if fn is None:
        return ""
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return code.co_code.hex() + repr(code.co_consts) if code is not None else None
