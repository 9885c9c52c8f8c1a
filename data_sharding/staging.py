"""One input file -> its valid events as Parquet and its rejected rows: the step both engines run
per file (the one-machine engine in its own connection, the Spark engine in an executor task).

Staging file by file bounds memory by the largest input file, not the input's total, and the
staged Parquet (compressed, with ``ord``: generation, file and record position) is what every
later stage reads: the id counts, and the encode pass that writes the coded partitions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import duckdb

from data_sharding import ingest, storage, validate
from data_sharding.errors import DataError


def stage_to_parquet(
    con: duckdb.DuckDBPyConnection, index: int, path: str, cfg: ingest.InputConfig, generation: int, dest: Path
) -> validate.FileQuarantine:
    """Parse and validate input ``index`` at ``path`` into the Parquet file ``dest`` (renamed into place
    when complete; see ``ingest.stage_file``); return its rejected rows. Nothing stays in ``con``."""
    tmp = dest.with_name(dest.name + ".tmp")
    src = ingest.stage_file(con, index, path, cfg, generation, parquet=tmp)
    try:
        quarantine = validate.file_quarantine(con, src)
    finally:
        if src.rejects_table is not None:
            con.execute(f"DROP TABLE IF EXISTS {src.rejects_table}")
    tmp.replace(dest)
    return quarantine


def valid_events_sql(files: list[Path | str]) -> str:
    """The valid events of staged files: user, item, ts, event_type, value, ord."""
    listed = ", ".join(f"'{f}'" for f in files)
    return f"SELECT user, item, ts, event_type, value, ord FROM read_parquet([{listed}]) WHERE reason IS NULL"


DISK_BYTES_PER_EVENT = 60
"""Peak disk use of a generation per input event (staged and coded scratch, parked rows, shards,
index and events logs), rounded up from the 100M and 1B runs in benchmarks/README.md."""
TEXT_BYTES_PER_EVENT = 25
"""Events of a text input are estimated as bytes / 25 (a short CSV line: erring towards more events)."""


def estimate_events(paths: list[str], fmt: str = "auto") -> int:
    """Events in the inputs: Parquet row counts from the footers, else an estimate from the bytes."""
    import pyarrow.parquet as pq

    total = 0
    for given in paths:
        local = storage.local_file(given)
        if local is not None and (fmt == "parquet" or (fmt == "auto" and local.endswith((".parquet", ".pq")))):
            try:
                total += pq.ParquetFile(local).metadata.num_rows
                continue
            except (OSError, ValueError):  # not Parquet after all: staging names the file and the problem
                pass
        size = os.path.getsize(local) if local is not None else storage.size(given)
        total += size * (5 if given.endswith((".gz", ".zst")) else 1) // TEXT_BYTES_PER_EVENT
    return total


def check_disk(paths: list[str], fmt: str, root: Path) -> None:
    """Stop before any work when the file system of ``root`` cannot hold the generation being built."""
    events = estimate_events(paths, fmt)
    need, free = events * DISK_BYTES_PER_EVENT, shutil.disk_usage(root).free
    if need > free:
        raise DataError(
            f"{root}: not enough free disk for about {events:,} events: a generation needs about "
            f"{need / 1e9:.1f} GB while it is built (staged and sorted rows, shards; {DISK_BYTES_PER_EVENT} bytes "
            f"per event), {free / 1e9:.1f} GB are free. Free space, or write --out on a larger disk."
        )
