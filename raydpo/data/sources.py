"""Turn whatever the user hands us into a Ray Dataset of raw preference rows."""

from __future__ import annotations

import os
from typing import Any

import ray

from raydpo.data.formats import check_rows

FILE_READERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
}


def to_ray_dataset(source: Any) -> "ray.data.Dataset":
    """A list of dicts, a .jsonl/.json/.parquet path, a `datasets.Dataset`, or a Ray Dataset."""
    if isinstance(source, ray.data.Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return _read_file(os.fspath(source))
    if isinstance(source, list):
        if not source:
            raise ValueError("train_dataset is an empty list: there is nothing to train on")
        # Checked here, not in Ray Data: a column mixing types (text and a number) cannot become an Arrow block.
        check_rows(source)
        return ray.data.from_items(source)
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        return ray.data.from_huggingface(source)
    raise TypeError(
        "train_dataset must be a list of dicts, a path to a .jsonl/.json/.parquet file, "
        f"a datasets.Dataset or a ray.data.Dataset; got {type(source).__name__}"
    )


def _read_file(path: str) -> "ray.data.Dataset":
    if not os.path.exists(path):
        raise FileNotFoundError(f"train_dataset: no such file {path!r}")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_READERS:
        raise ValueError(f"train_dataset: unsupported file type {ext!r} ({path}); use one of {sorted(FILE_READERS)}")
    if FILE_READERS[ext] == "parquet":
        return ray.data.read_parquet(path)
    if ext == ".json" and _starts_with_array(path):
        import json

        # A JSON array is one document: read it whole, then hand the rows to Ray Data.
        with open(path) as f:
            return to_ray_dataset(json.load(f))
    return ray.data.read_json(path, lines=True)


def _starts_with_array(path: str) -> bool:
    with open(path) as f:
        for char in iter(lambda: f.read(1), ""):
            if not char.isspace():
                return char == "["
    return False
