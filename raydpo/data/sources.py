"""Turn whatever the user hands us into a Ray Dataset of raw preference rows.

Files and in-memory lists travel as *JSON rows* (RAW_COLUMNS): each row's JSON text and where it
came from ("pairs.jsonl line 7"). Rows are parsed only in the tokenization tasks, so a row of the
wrong shape or type never has to fit an Arrow schema (which would fail the whole read, or fill absent
fields with None), and a malformed line is reported with its file and line number. Sources that are
only parquet files, `datasets` datasets and Ray Datasets are already Arrow and pass through as they are.
"""

from __future__ import annotations

import gzip
import json
import os
import weakref
from typing import Any, Callable, Iterator, Optional, Tuple

import numpy as np
import pyarrow as pa
import ray

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
# The columns of a JSON row: its JSON text, where it came from, why it can't be read, and whether
# that error is fatal (never skipped: a whole file is unreadable).
RAW_COLUMNS = JSON_COLUMN, WHERE_COLUMN, ERROR_COLUMN, FATAL_COLUMN = (
    "_raydpo_json", "_raydpo_where", "_raydpo_error", "_raydpo_fatal")
_RAW_SCHEMA = pa.schema([(JSON_COLUMN, pa.string()), (WHERE_COLUMN, pa.string()), (ERROR_COLUMN, pa.string()),
                         (FATAL_COLUMN, pa.bool_())])

# Ray Datasets built here remember what they were built from, so the tokenized-dataset cache can key
# them (an arbitrary Ray Dataset has no cheap identity).
_ORIGINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def to_ray_dataset(source: Any, split: Optional[str] = None, map_fn: Optional[Callable[[dict], dict]] = None,
                   split_name: str = "train_dataset") -> "ray.data.Dataset":
    """A Ray Dataset of raw rows from: a list of dicts; a path, or a list of paths, to .jsonl / .json /
    .parquet files (.jsonl.gz / .json.gz too) or folders of them; a `datasets.Dataset`, a `DatasetDict`
    (`split`, default "train") or a folder saved with `save_to_disk`; or a Ray Dataset.

    `map_fn(row) -> row` is applied to every raw row first (the user's preprocessing, as with
    `datasets.map`); the dict it returns replaces the row, and an exception it raises is reported as a
    bad row naming the row.
    """
    ds = _read(source, split, split_name)
    if map_fn is not None:
        ds = ds.map_batches(_apply_map_fn, fn_kwargs={"map_fn": map_fn}, batch_format="pyarrow", batch_size=256)
    if not isinstance(source, ray.data.Dataset):  # (a Ray Dataset has no key; and a self-reference would leak)
        _ORIGINS[ds] = (source, split, map_fn)
    return ds


def origin(ds: "ray.data.Dataset") -> Optional[Tuple[Any, Optional[str], Optional[Callable]]]:
    """(source, split, map_fn) of a dataset made by `to_ray_dataset`, else None."""
    return _ORIGINS.get(ds)


def raw_rows(table: pa.Table) -> Iterator[Tuple[Any, str, Optional[str], bool]]:
    """(row, where, error, fatal) for each row of a block of raw rows, JSON or Arrow. Decided per row:
    Ray Data merges small blocks into one batch, so a union of both kinds can share a batch."""
    for row in table.to_pylist():
        text, where, error, fatal = (row.pop(name, None) for name in RAW_COLUMNS)
        if error:
            yield None, where or "", error, bool(fatal)
        elif text is None:  # an Arrow row
            yield row, "", None, False
        else:
            try:
                yield json.loads(text), where or "", None, False
            except json.JSONDecodeError as e:
                yield None, where or "", f"malformed JSON: {e.msg} (column {e.colno})", False


def json_row(row: Any, where: str = "", error: str = "", fatal: bool = False) -> dict:
    """One JSON row (the form every JSON source takes here)."""
    text = ""
    if not error:
        try:
            text = json.dumps(row, default=jsonable, ensure_ascii=False)
        except (TypeError, ValueError) as e:
            error = f"can't be stored as JSON: {e}"
    return {JSON_COLUMN: text, WHERE_COLUMN: where, ERROR_COLUMN: error, FATAL_COLUMN: fatal}


def data_files(paths: list, split_name: str = "train_dataset") -> list:
    """The data files named by `paths`, folders expanded (recursively, sorted, hidden names skipped)."""
    files = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs[:] = sorted(d for d in dirs if not d.startswith((".", "_")))
                found += sorted(os.path.join(root, n) for n in names if _kind(n) and not n.startswith((".", "_")))
            if not found:
                raise ValueError(f"{split_name}: folder {path!r} holds no "
                                 f"{'/'.join(JSON_SUFFIXES + PARQUET_SUFFIXES)} files")
            files += found
        elif not os.path.exists(path):
            raise FileNotFoundError(f"{split_name}: no such file {path!r}")
        elif not _kind(path):
            raise ValueError(f"{split_name}: unsupported file type ({path}); use "
                             f"{', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)} files, or a folder of them")
        else:
            files.append(path)
    return files


def _read(source: Any, split: Optional[str], split_name: str) -> "ray.data.Dataset":
    if isinstance(source, ray.data.Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError(f"{split_name} is an empty list: there is nothing to train on")
        if all(isinstance(item, (str, os.PathLike)) for item in source):
            if len(source) == 1 and is_saved_dataset(os.fspath(source[0])):
                import datasets

                return _read(datasets.load_from_disk(os.fspath(source[0])), split, split_name)
            return _read_files(data_files(list(source), split_name))
        return ray.data.from_items([json_row(row) for row in source])
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        split = split or "train"
        if split not in source:
            raise ValueError(f"{split_name} is a DatasetDict without a {split!r} split (it has {sorted(source)}); "
                             f"pass dataset[<split>]")
        source = source[split]
    if datasets is not None and isinstance(source, datasets.Dataset):
        return _from_arrow_dataset(source)
    if datasets is not None and isinstance(source, datasets.IterableDataset):
        return ray.data.from_huggingface(source)
    raise TypeError(
        f"{split_name} must be a list of dicts, a path (or list of paths) to .jsonl/.json/.parquet files or "
        f"folders, a datasets.Dataset or DatasetDict, or a ray.data.Dataset; got {type(source).__name__}")


def _from_arrow_dataset(dataset, rows_per_block: int = 1024) -> "ray.data.Dataset":
    """A `datasets.Dataset`'s rows (its Arrow table, selections and shuffles applied), without
    ray.data.from_huggingface: that asks the Hub for the parquet files of the dataset the info names, and
    a Dataset loaded from a local folder is named after the folder, so offline it fails and online it
    could read another dataset of that name."""
    table = dataset.with_format("arrow")[:]
    return ray.data.from_arrow([table.slice(start, rows_per_block)
                                for start in range(0, max(len(table), 1), rows_per_block)])


def _read_files(files: list) -> "ray.data.Dataset":
    if all(_kind(f) == "parquet" for f in files):
        return ray.data.read_parquet(files)
    # One task per file reads its bytes and splits them into rows (exact line numbers). Parquet files
    # beside JSON ones go the same way: a union of two readers would not keep the files' order.
    return ray.data.read_binary_files(files, include_paths=True).flat_map(_file_rows)


def _file_rows(file: dict) -> list:
    """The JSON rows of one file: a parquet table, a JSON array (one document) or JSON lines."""
    data, path = file["bytes"], file["path"]
    if _kind(path) == "parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
        return [json_row(row, f"{path} row {i}") for i, row in enumerate(rows)]
    if data[:2] == b"\x1f\x8b":  # gzip (Ray already decompresses files whose name ends in .gz)
        data = gzip.decompress(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return [json_row(None, path, f"is not UTF-8 text ({e})", fatal=True)]
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            return [json_row(None, f"{path} line {e.lineno}", f"malformed JSON: {e.msg} (column {e.colno}); "
                                                              "the file is one JSON array, so none of it can be read",
                             fatal=True)]
        return [json_row(item, f"{path} item {i}") for i, item in enumerate(items)]
    # JSON lines end at "\n" only (str.splitlines would also split at characters JSON leaves unescaped).
    return [{JSON_COLUMN: line, WHERE_COLUMN: f"{path} line {number}", ERROR_COLUMN: "", FATAL_COLUMN: False}
            for number, line in enumerate(text.split("\n"), 1) if line.strip()]


def _apply_map_fn(table: pa.Table, map_fn) -> pa.Table:
    rows = []
    for row, where, error, fatal in raw_rows(table):
        if error is None:
            try:
                row = map_fn(row)
                if not isinstance(row, dict):
                    raise TypeError(f"it returned {type(row).__name__}, expected a dict")
            except Exception as e:  # a user function failing on one row is that row's error, not a crash
                error = f"map_fn failed: {type(e).__name__}: {e}"
        rows.append(json_row(row, where, error or "", fatal))
    return pa.Table.from_pylist(rows, schema=_RAW_SCHEMA)


def jsonable(value):
    from raydpo.data.images import to_json

    encoded = to_json(value)  # an image or bytes, as base64
    if encoded is not None:
        return encoded
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _kind(name: str) -> Optional[str]:
    name = name.lower()
    return "json" if name.endswith(JSON_SUFFIXES) else "parquet" if name.endswith(PARQUET_SUFFIXES) else None


def is_saved_dataset(path: str) -> bool:
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name))
                                       for name in ("dataset_info.json", "dataset_dict.json"))
