"""Where a dataset is read from: a local folder or any fsspec URL (``file://``, ``s3://``,
``gs://``, ``hdfs://``, ``memory://`` ...; the backends come from fsspec and its plugins such as
s3fs and gcsfs, installed separately).

Read through here: ``bgpt shard``'s input files (fetched to local scratch once, by the process
that parses them: the driver with DuckDB, each task with Spark) and the manifest, vocab tables,
shard indexes and shards that training, evaluation and prediction stream. ``bgpt shard`` writes
a local folder (atomic renames need a real file system); publish it to object storage with any
copy tool, the dataset is position independent (every path in the manifest is relative).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from data_sharding.errors import DataError

Root = str | Path


def is_url(root: Root) -> bool:
    return "://" in str(root)


def as_root(value: Root) -> Root:
    """A dataset location as given: a URL stays a string (``Path`` would fold ``//``), a local path
    becomes a ``Path``."""
    return str(value) if is_url(value) else Path(value)


def join(root: Root, rel: str) -> str | Path:
    if is_url(root):
        return str(root).rstrip("/") + "/" + rel
    return Path(root) / rel


def _fs(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        raise DataError(f"{url}: no fsspec backend for this URL ({e}); e.g. pip install s3fs or gcsfs") from None


def read_bytes(root: Root, rel: str) -> bytes:
    """The whole file ``rel`` under ``root``; FileNotFoundError when it is not there."""
    target = join(root, rel)
    if not is_url(root):
        return Path(target).read_bytes()
    fs, path = _fs(str(target))
    with fs.open(path, "rb") as f:
        return f.read()


def exists(root: Root, rel: str) -> bool:
    target = join(root, rel)
    if not is_url(root):
        return Path(target).exists()
    fs, path = _fs(str(target))
    return fs.exists(path)


def read_parquet(root: Root, rel: str, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    if not is_url(root):
        return pq.read_table(join(root, rel), columns=columns)
    return pq.read_table(io.BytesIO(read_bytes(root, rel)), columns=columns)


def local_file(value: str) -> str | None:
    """The local path behind a plain path or a ``file://`` URL; None for any other URL."""
    if not is_url(value):
        return value
    if value.startswith("file://"):
        return value[len("file://") :]
    return None


def check_remote_input(url: str) -> None:
    """One-line errors for a missing, directory or empty input behind a URL."""
    fs, path = _fs(url)
    if not fs.exists(path):
        raise DataError(f"{url}: no such file")
    if fs.isdir(path):
        raise DataError(f"{url}: is a directory, expected a file")
    if fs.size(path) == 0:
        raise DataError(f"{url}: file is empty")


def fetch_input(value: str, scratch: Path, index: int) -> str:
    """A local path to read input ``value`` from: itself when local, else a copy in ``scratch``.

    The copy keeps the file's name (its extension tells the format)."""
    local = local_file(value)
    if local is not None:
        return local
    fs, path = _fs(value)
    scratch.mkdir(parents=True, exist_ok=True)
    dest = scratch / f"{index:06d}-{Path(path).name}"
    fs.get(path, str(dest))
    return str(dest)


def fingerprint_input(value: str, fetched: str | None = None) -> dict:
    """Path (absolute, or the URL as given), size and sha256 of an input file; ``fetched``: the local
    copy :func:`fetch_input` made of a URL, hashed instead of reading the URL again."""
    local = local_file(value)
    if local is not None:
        opener, name, size = open(local, "rb"), os.path.abspath(local), os.path.getsize(local)  # noqa: SIM115
    elif fetched is not None:
        opener, name, size = open(fetched, "rb"), value, os.path.getsize(fetched)  # noqa: SIM115
    else:
        fs, path = _fs(value)
        opener, name, size = fs.open(path, "rb"), value, fs.size(path)
    digest = hashlib.sha256()
    with opener as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return {"path": name, "bytes": int(size), "sha256": digest.hexdigest()}
