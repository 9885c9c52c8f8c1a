"""`bgpt shard --engine duckdb` (the default): every event-sized stage of the pipeline in the
pipeline's own DuckDB connection, on one machine, with memory bounded whatever the input size.

1. Stage: each input file is parsed and validated on its own, its valid rows written as Parquet
   (``staging.stage_to_parquet``), its tables dropped: memory grows with the largest file only.
2. Codes (pipeline): distinct items and types and events per user, read from the staged Parquet.
3. Encode + partition: one pass joins the staged rows with the id codes and writes compact coded
   rows (31 bytes before compression), partitioned by ranges of whole shards, each partition small
   enough to sort in memory (``SORT_BYTES_PER_ROW``).
4. Sort + pass one, partition by partition: a partition holds whole shards, so each shard's rows
   come out in exactly the order one global sort by (shard, user, time, input order) gives, and
   the shards are byte-identical to a single sort's. A dataset that fits one partition skips 3.
"""

from __future__ import annotations

import math
import re
import shutil
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
from tqdm import tqdm

from data_sharding import ingest, sequences, staging, storage, writer
from data_sharding.errors import DataError

SORT_BYTES_PER_ROW = 150
"""Memory budget per coded row when sizing partitions: a partition of memory_limit / 150 rows (20M
at 3GB) sorts in memory (the row is 31 bytes; DuckDB's sort keys and payload take about 3x that)."""


def memory_bytes(limit: str) -> int:
    """A memory limit as DuckDB reads it ('3GB', '512MB', '2GiB') in bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", limit, re.IGNORECASE)
    if not match:
        raise DataError(f"--memory-limit {limit!r}: expected a size such as 3GB")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), match.group(3)
    return int(number * (1024 if binary else 1000) ** "_KMGT".index(unit or "_"))


class _Fingerprints(threading.Thread):
    """Hashes the inputs in the background (hashlib releases the GIL) while DuckDB reads them."""

    def __init__(self, inputs: list[tuple[str, str]]) -> None:
        super().__init__(daemon=True)
        self.inputs, self.result, self.error = inputs, [], None

    def run(self) -> None:
        try:
            self.result = [storage.fingerprint_input(given, fetched) for given, fetched in self.inputs]
        except (OSError, DataError) as e:
            self.error = e


class DuckDBEngine:
    """The one-machine engine: every stage in the pipeline's own DuckDB connection (``cfg``: a
    ``pipeline.ShardConfig``)."""

    def __init__(self, cfg, con: duckdb.DuckDBPyConnection, work: Path) -> None:
        self.cfg, self.con, self.work = cfg, con, work
        self._fingerprints: _Fingerprints | None = None
        self.sub_phases: dict[str, float] = {}
        """Seconds of the parts of a phase (recorded in the manifest beside the phases)."""

    def stage(self, generation: int) -> list:
        """Parse and validate every input into staged Parquet; leave the valid rows in view ``events``."""
        paths = self.cfg.input.paths
        fetched = [storage.fetch_input(given, self.work / "inputs", i) for i, given in enumerate(paths)]
        self._fingerprints = _Fingerprints(list(zip(paths, fetched, strict=True)))
        self._fingerprints.start()
        staged_dir = self.work / "staged"
        staged_dir.mkdir(exist_ok=True)
        files, staged = [], []
        with tqdm(total=len(paths), unit="file", desc="read+validate", disable=None) as bar:
            for i, (given, local) in enumerate(zip(paths, fetched, strict=True)):
                staged.append(staged_dir / f"events-{i:06d}.parquet")
                try:
                    files.append(
                        staging.stage_to_parquet(self.con, i, local, self.cfg.input, generation, staged[-1]).named(
                            given
                        )
                    )
                except DataError as e:
                    raise DataError(str(e).replace(local, given)) from None
                if local != given and storage.is_url(given):
                    Path(local).unlink(missing_ok=True)  # a fetched copy is not needed once staged
                bar.update(1)
        self.con.execute(f"CREATE OR REPLACE VIEW events AS {staging.valid_events_sql(staged)}")
        return files

    def seen_ids(self) -> tuple[str, str, str]:
        """Relations of the distinct items, the distinct event types and (user, n) events per user."""
        return "events", "events", "(SELECT user, count(*) AS n FROM events GROUP BY user)"

    def sorted_pass(
        self, logs: list[str], total_rows: int, num_shards: int, generation: int, n_items: int, n_types: int
    ) -> sequences.PassOneResult:
        """Sort events by (shard, user, time, input order), partition by partition, and run pass one."""
        rows_per_part = memory_bytes(self.cfg.memory_limit) // SORT_BYTES_PER_ROW
        shards_per_part = max(1, rows_per_part // max(1, math.ceil(total_rows / num_shards)))
        parts = math.ceil(num_shards / shards_per_part)
        with tqdm(total=total_rows, unit="ev", unit_scale=True, desc="sort+dedup", disable=None) as bar:

            def sorted_pass_one(rows: str) -> sequences.PassOneResult:
                query = f"SELECT * FROM {rows} ORDER BY shard, uidx, ts, ord"
                reader = self.con.sql(query).to_arrow_reader(1_000_000)
                return sequences.pass_one(reader, self.work, generation, n_items, n_types, bar)

            if parts == 1:
                return sorted_pass_one(f"({events_sql(logs)})")
            coded = self.work / "coded"
            started = time.perf_counter()
            self.con.execute(
                f"COPY (SELECT *, shard // {shards_per_part} AS part FROM ({events_sql(logs)})) TO '{coded}' "
                f"({ingest.STAGED_WRITE}, PARTITION_BY (part))"
            )
            shutil.rmtree(self.work / "staged")  # everything later reads the coded rows
            self.sub_phases["sort_dedup.encode"] = round(time.perf_counter() - started, 3)
            results = []
            for part in range(parts):
                folder = coded / f"part={part}"
                if folder.exists():  # else no user hashed to any of its shards
                    results.append(sorted_pass_one(f"read_parquet('{folder}/*.parquet')"))
                    shutil.rmtree(folder)
            return merge_pass_one(results, n_items, n_types)

    map_shards = staticmethod(writer.thread_map)

    def fingerprints(self) -> list[dict]:
        """Path, bytes and sha256 of every input (hashed in a thread while DuckDB parsed)."""
        self._fingerprints.join()
        if self._fingerprints.error:
            raise DataError(f"cannot read an input to fingerprint it: {self._fingerprints.error}")
        return self._fingerprints.result

    def close(self) -> None:
        pass


def events_sql(logs: list[str]) -> str:
    """This generation's valid events and touched users' earlier events, coded: (shard, uidx, ts,
    ord, item, type, value)."""
    new = (
        "SELECT u.shard, u.uidx, e.ts, e.ord, i.code AS item, t.code::SMALLINT AS type, e.value "
        "FROM events e JOIN user_shards u ON e.user = u.user JOIN item_codes i ON e.item = i.key "
        "JOIN type_codes t ON e.event_type = t.key"
    )
    if logs:
        # Touched users' earlier events, so each new event lands with its preceding history.
        files = "[" + ", ".join(f"'{p}'" for p in logs) + "]"
        new += (
            " UNION ALL SELECT u.shard, o.uidx, o.ts, o.ord, o.item, o.type, o.value "
            f"FROM read_parquet({files}) o JOIN user_shards u ON o.uidx = u.uidx"
        )
    return new


def merge_pass_one(results: list[sequences.PassOneResult], n_items: int, n_types: int) -> sequences.PassOneResult:
    """One pass-one result from those of disjoint sets of shards."""
    files = {shard: path for r in results for shard, path in r.shard_files.items()}
    return sequences.PassOneResult(
        dict(sorted(files.items())),
        sum((r.item_counts for r in results), np.zeros(n_items, dtype=np.int64)),
        sum((r.type_counts for r in results), np.zeros(n_types, dtype=np.int64)),
        sum(r.duplicates for r in results),
    )
