"""Write one generation's shards, their indexes and events logs from the sorted, de-duplicated pass."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_sharding import sequences, shards

_LOG_SCHEMA = pa.schema(
    [
        ("uidx", pa.int32()),
        ("ts", pa.int64()),
        ("ord", pa.int64()),
        ("item", pa.int32()),
        ("type", pa.int16()),
        ("value", pa.float32()),
    ]
)


@dataclass
class _WrittenShard:
    info: shards.ShardInfo
    uidx: np.ndarray
    lengths: np.ndarray
    rare: int
    new_events: int


def _write_one_shard(shard: int, path: Path | None, *, out_dir: Path, generation: int, remap: dict) -> _WrittenShard:
    """Final records of one shard -> tar + index on disk; returns what the manifest and logs need."""
    rows = np.load(path) if path is not None else np.empty(0, sequences.STREAM_DTYPE)
    records, rows, dropped = sequences.final_records(rows, generation=generation, **remap)
    starts, lengths = sequences.user_bounds(rows["uidx"])
    uidx = rows["uidx"][starts]
    data, offsets = shards.build_shard(records, uidx, lengths)
    index_data = shards.index_bytes(_shard_index(records, uidx, offsets, starts, lengths))
    name = f"shard-{shard:06d}"
    (out_dir / f"{name}.tar").write_bytes(data)
    (out_dir / f"{name}.idx.npy").write_bytes(index_data)
    if path is not None:
        path.unlink()
    new = records["new"].astype(bool)
    info = shards.ShardInfo(
        name=f"{out_dir.name}/{name}.tar",
        index=f"{out_dir.name}/{name}.idx.npy",
        sha256=hashlib.sha256(data).hexdigest(),
        index_sha256=hashlib.sha256(index_data).hexdigest(),
        bytes=len(data),
        users=len(uidx),
        events=len(records),
        generation=generation,
    )
    # This generation's new events, for later --append runs to fetch touched users' history. Items
    # and types are logged as final ids (a later generation's codes for known ids are those ids),
    # never as this generation's provisional codes.
    columns = {"uidx": rows["uidx"], "ts": rows["ts"], "ord": rows["ord"], "item": records["item"]}
    columns.update(type=records["type"], value=rows["value"])
    log_rows = pa.table({n: columns[n][new] for n in _LOG_SCHEMA.names}, schema=_LOG_SCHEMA)
    pq.write_table(log_rows, out_dir / "events" / f"{name}.parquet", compression="lz4")
    return _WrittenShard(info, uidx, lengths, dropped, int(new.sum()))


def thread_map(fn: Callable, jobs: list) -> list:
    """Run ``fn`` over ``jobs`` two at a time (numpy, hashing and file I/O release the GIL), in order."""
    with (
        ThreadPoolExecutor(max_workers=2) as pool,
        tqdm(total=len(jobs), unit="shard", desc="write shards", disable=None) as bar,
    ):
        futures = [pool.submit(fn, *job) for job in jobs]
        results = []
        for future in futures:
            results.append(future.result())
            bar.update(1)
    return results


def write_shards(
    out_dir: Path,
    p1: sequences.PassOneResult,
    num_shards: int,
    generation: int,
    remap: dict,
    mapper: Callable[[Callable, list], list] = thread_map,
) -> dict:
    """Write every shard and its events log; ``mapper(fn, jobs)`` runs ``fn(*job)`` per shard, in order.

    The default runs in local threads; the Spark engine runs the same function in its executors.
    """
    (out_dir / "events").mkdir()
    write = partial(_write_one_shard, out_dir=out_dir, generation=generation, remap=remap)
    written: list[_WrittenShard] = mapper(write, [(shard, p1.shard_files.get(shard)) for shard in range(num_shards)])
    return {
        "shards": [w.info for w in written],
        "rare": sum(w.rare for w in written),
        "new_events": sum(w.new_events for w in written),
        "uidx": np.concatenate([w.uidx for w in written]) if written else np.empty(0, np.int32),
        "n_events": np.concatenate([w.lengths for w in written]) if written else np.empty(0, np.int64),
    }


def _shard_index(records, uidx, offsets, starts, lengths) -> np.ndarray:
    index = np.empty(len(uidx), dtype=shards.INDEX_DTYPE)
    index["uidx"] = uidx
    index["offset"] = offsets
    index["n_events"] = lengths
    split = records["split"]
    index["n_train"] = np.add.reduceat(split == shards.SPLIT_TRAIN, starts) if len(starts) else 0
    index["n_valid"] = np.add.reduceat(split == shards.SPLIT_VALID, starts) if len(starts) else 0
    index["n_new"] = np.add.reduceat(records["new"].astype(np.int64), starts) if len(starts) else 0
    return index
