"""Where a run's files live: a local (or NFS-mounted) folder, or a URI (s3://, gs://, ...) that pyarrow.fs
understands. Every node reads and writes the same place, so checkpoints, a resumed run and the reference
cache need no file that exists only on the driver.

A URI may carry pyarrow's options in its query string (`s3://bucket/prefix?endpoint_override=host:port&
scheme=http` for an S3-compatible server); `join` keeps that query on every path derived from it, so a
checkpoint URI handed back to the user opens the same server again. Credentials come from the
environment as the cloud SDKs read them (AWS_ACCESS_KEY_ID..., GOOGLE_APPLICATION_CREDENTIALS), on
every node.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
from typing import Iterator, Optional, Tuple
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs


def is_uri(path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def absolute(path: Optional[str]) -> Optional[str]:
    """A URI as it is; a local path made absolute (the workers' working directory differs)."""
    if path is None or is_uri(path):
        return path
    if isinstance(path, str) and path.startswith("file://"):
        path = path[len("file://"):]
    return os.path.abspath(os.fspath(path))


def join(base: str, *parts: str) -> str:
    """os.path.join for local paths; for a URI, the parts go on its path and its query string stays."""
    if not is_uri(base):
        return os.path.join(base, *parts)
    split = urlsplit(base)
    return urlunsplit(split._replace(path=posixpath.join(split.path or "/", *parts)))


def resolve(path: str) -> Tuple[pafs.FileSystem, str]:
    """(filesystem, path on it): pyarrow's S3 / GCS / HDFS filesystem for a URI, the local one otherwise."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), absolute(path)


def to_uri(base: str, fs_path: str) -> str:
    """The path `fs_path` of `base`'s filesystem (what Ray Train reports: the bucket and key, no scheme)
    as a URI like `base` (its scheme and query), or a local path when `base` is one."""
    if not is_uri(base):
        return fs_path
    split = urlsplit(base)
    bucket, _, key = fs_path.lstrip("/").partition("/")
    return urlunsplit(split._replace(netloc=bucket, path="/" + key))


def is_dir(path: str) -> bool:
    fs, fs_path = resolve(path)
    return fs.get_file_info(fs_path).type == pafs.FileType.Directory


def is_file(path: str) -> bool:
    fs, fs_path = resolve(path)
    return fs.get_file_info(fs_path).type == pafs.FileType.File


def copy_dir(source: str, destination: str) -> str:
    """Copy a folder's files between any two of local / URI (pyarrow.fs.copy_files); returns destination."""
    source_fs, source_path = resolve(source)
    destination_fs, destination_path = resolve(destination)
    if isinstance(destination_fs, pafs.LocalFileSystem):
        os.makedirs(destination_path, exist_ok=True)
    pafs.copy_files(source_path, destination_path, source_filesystem=source_fs,
                    destination_filesystem=destination_fs, use_threads=True)
    return destination


def delete_dir(path: str) -> None:
    """Delete a folder and everything in it, local or at a URI."""
    fs, fs_path = resolve(path)
    fs.delete_dir(fs_path)


@contextlib.contextmanager
def local_dir(path: str) -> Iterator[str]:
    """The folder `path` on this machine while the block runs: itself when local, else a downloaded copy."""
    if not is_uri(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="raydpo-download-") as directory:
        yield copy_dir(path, directory)

