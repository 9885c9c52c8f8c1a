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
import json
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


def size(url: str) -> int:
    """Bytes of the file behind a URL."""
    fs, path = _fs(url)
    return int(fs.size(path))


def check_remote_input(url: str) -> None:
    """One-line errors for a missing, directory or empty input behind a URL."""
    fs, path = _fs(url)
    if not fs.exists(path):
        raise DataError(f"{url}: no such file")
    if fs.isdir(path):
        raise DataError(f"{url}: is a directory, expected a file")
    if fs.size(path) == 0:
        raise DataError(f"{url}: file is empty")


DATA_SUFFIXES = (".parquet", ".pq", ".arrow", ".csv", ".tsv", ".jsonl", ".ndjson", ".json")
METADATA_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")


def _list_dir(fs, path: str) -> list[str]:
    """Data files under ``path``, sorted: a ``datasets.save_to_disk`` folder's Arrow files (every
    split of a DatasetDict), else every data file below it (Hub-style layouts such as
    ``data/train-00000-of-00002.parquet`` or ``default/train/0000.parquet``), leaving out hidden and
    ``_``-prefixed names (``.cache``, ``_SUCCESS``) and the folder's own JSON metadata."""
    path = path.rstrip("/")
    if fs.exists(f"{path}/dataset_dict.json"):
        with fs.open(f"{path}/dataset_dict.json") as f:
            splits = json.load(f)["splits"]
        return [file for split in splits for file in _list_dir(fs, f"{path}/{split}")]
    if fs.exists(f"{path}/state.json"):
        with fs.open(f"{path}/state.json") as f:
            return [f"{path}/{entry['filename']}" for entry in json.load(f)["_data_files"]]
    found = []
    for file in sorted(fs.find(path)):
        rel = file[len(path) :].lstrip("/")
        name = rel.lower().removesuffix(".gz").removesuffix(".zst")
        hidden = any(part.startswith((".", "_")) for part in rel.split("/"))
        if not hidden and name.endswith(DATA_SUFFIXES) and name.rsplit("/", 1)[-1] not in METADATA_FILES:
            found.append(file)
    return found


def expand_inputs(values: list[str]) -> list[str]:
    """Input files as given, with every folder (local or URL) replaced by the data files in it and
    every glob pattern by its matches; a folder or pattern with none is an error."""
    files = []
    for value in values:
        local = local_file(value)
        if local is not None and not os.path.isdir(local) and not any(c in local for c in "*?["):
            files.append(value)
            continue
        if local is not None:
            import fsspec

            fs, path, prefix = fsspec.filesystem("file"), os.path.abspath(local), ""
        else:
            fs, path = _fs(value)
            prefix = value.split("://", 1)[0] + "://"
        if any(c in path for c in "*?["):
            found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
        elif fs.isdir(path):
            found = _list_dir(fs, path)
        else:
            files.append(value)
            continue
        if not found:
            raise DataError(f"{value}: no data files ({', '.join(DATA_SUFFIXES)}) in it")
        files += [p if local is not None else prefix + p.removeprefix(prefix).lstrip("/") for p in found]
    return files


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
