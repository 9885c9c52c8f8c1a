"""Where a dataset is read from: a local folder or any fsspec URL (``file://``, ``s3://``,
``gs://``, ``hdfs://``, ``memory://`` ...; the backends come from fsspec and its plugins such as
s3fs and gcsfs, installed separately).

Only the read side goes through here: the manifest, vocab tables, shard indexes and shards that
training, evaluation and prediction stream. ``bgpt shard`` writes a local folder (atomic
renames need a real file system); publish it to object storage with any copy tool, the dataset
is position independent (every path in the manifest is relative).
"""

from __future__ import annotations

import io
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
