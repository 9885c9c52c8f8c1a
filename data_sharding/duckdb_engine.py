"""`bgpt shard --engine duckdb` (the default): every event-sized stage of the pipeline in the
pipeline's own DuckDB connection, on one machine (out of core beyond the memory limit)."""

from __future__ import annotations

import threading
from pathlib import Path

import duckdb
from tqdm import tqdm

from data_sharding import ingest, sequences, storage, validate, writer
from data_sharding.errors import DataError


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

    def stage(self, generation: int) -> list[validate.FileQuarantine]:
        """Parse and validate every input; leave the valid rows in view ``events``."""
        paths = self.cfg.input.paths
        fetched = [storage.fetch_input(given, self.work / "inputs", i) for i, given in enumerate(paths)]
        self._fingerprints = _Fingerprints(list(zip(paths, fetched, strict=True)))
        self._fingerprints.start()
        sources, files = [], []
        for i, (given, local) in enumerate(zip(paths, fetched, strict=True)):
            try:
                sources.append(ingest.stage_file(self.con, i, local, self.cfg.input))
            except DataError as e:
                raise DataError(str(e).replace(local, given)) from None
            files.append(validate.file_quarantine(self.con, sources[-1]).named(given))
        union = " UNION ALL ".join(ingest.valid_events_sql(s, generation) for s in sources)
        if len(sources) == 1:
            self.con.execute(f"CREATE OR REPLACE VIEW events AS {union}")
            return files
        # Several files: one table of valid events, staged tables dropped. Joining and sorting a
        # UNION ALL of many staged tables ran out of memory at 100M events in 8 files under a 3 GB
        # limit (one table of the same rows does not; benchmarks/README.md).
        self.con.execute(f"CREATE OR REPLACE TABLE events AS {union}")
        for s in sources:
            self.con.execute(f"DROP TABLE {s.table}")
        return files

    def seen_ids(self) -> tuple[str, str, str]:
        """Relations of the distinct items, the distinct event types and (user, n) events per user."""
        return "events", "events", "(SELECT user, count(*) AS n FROM events GROUP BY user)"

    def sorted_pass(
        self, logs: list[str], total_rows: int, num_shards: int, generation: int, n_items: int, n_types: int
    ) -> sequences.PassOneResult:
        """Sort events by (shard, user, time, input order) out of core and run pass one over the stream."""
        with tqdm(total=total_rows, unit="ev", unit_scale=True, desc="sort+dedup", disable=None) as bar:
            reader = self.con.sql(sorted_events_sql(logs)).to_arrow_reader(1_000_000)
            return sequences.pass_one(reader, self.work, generation, n_items, n_types, bar)

    map_shards = staticmethod(writer.thread_map)

    def fingerprints(self) -> list[dict]:
        """Path, bytes and sha256 of every input (hashed in a thread while DuckDB parsed)."""
        self._fingerprints.join()
        if self._fingerprints.error:
            raise DataError(f"cannot read an input to fingerprint it: {self._fingerprints.error}")
        return self._fingerprints.result

    def close(self) -> None:
        pass


def sorted_events_sql(logs: list[str]) -> str:
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
    return f"SELECT * FROM ({new}) ORDER BY shard, uidx, ts, ord"
