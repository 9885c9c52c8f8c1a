"""`bgpt shard`: raw events -> validated, de-duplicated, per-user shards + manifest, one generation at a time.

A generation is built in a hidden temporary folder inside the dataset and renamed into place
when complete; ``manifest.json`` is then replaced atomically. An interrupted run therefore
leaves the previous manifest and every earlier generation untouched and loadable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa
from tqdm import tqdm

from data_sharding import ingest, sequences, shards, storage, validate, vocab, writer
from data_sharding.errors import DataError
from data_sharding.ingest import InputConfig
from data_sharding.sequences import SplitConfig

ENGINES = ("duckdb", "spark")


@dataclass
class ShardConfig:
    """Options of `bgpt shard`."""

    out: str = ""
    """Dataset folder: holds manifest.json and one gNNNN/ folder per generation."""
    input: InputConfig = field(default_factory=InputConfig)
    split: SplitConfig | None = None
    """How held-out events are chosen (default: leave-one-out; an append keeps the dataset's)."""
    items: str | None = None
    """Optional item metadata file (id, title/text, attributes)."""
    items_format: str = "auto"
    append: bool = False
    """Add a generation to an existing dataset instead of creating one."""
    overwrite: bool = False
    """Replace an existing dataset in ``out``."""
    events_per_shard: int = 2_000_000
    shard_multiple: int = 1
    """The shard count is rounded up to a multiple of this (ranks x loader workers of the training
    job), so each reader streams whole shards of about the same size."""
    min_item_count: int = 1
    """Items with fewer (de-duplicated) events are left out of the vocabulary, with their events."""
    max_bad_fraction: float = 0.01
    memory_limit: str = "3GB"
    """DuckDB memory limit; beyond it DuckDB spills to the temporary folder."""
    threads: int | None = None
    temp_dir: str | None = None
    """Where DuckDB (and Spark, in local mode) spill; default: inside the generation's temporary folder."""
    engine: str = "duckdb"
    """duckdb (one machine) or spark (the event-sized stages run as Spark jobs; see data_sharding/spark_engine.py)."""
    master: str | None = None
    """Spark master URL (engine spark): local[*] by default; ignored when a Spark session already runs
    (spark-submit)."""
    spark_conf: dict[str, str] = field(default_factory=dict)
    """Extra Spark settings (engine spark), e.g. {"spark.executor.memory": "8g"}."""

    def __post_init__(self) -> None:
        if not self.out:
            raise DataError("--out is required")
        if self.events_per_shard < 1:
            raise DataError("--events-per-shard must be >= 1")
        if self.shard_multiple < 1:
            raise DataError("--shard-multiple must be >= 1")
        if self.min_item_count < 1:
            raise DataError("--min-item-count must be >= 1")
        if not 0 <= self.max_bad_fraction <= 1:
            raise DataError("--max-bad-fraction must be in [0, 1]")
        if self.append and self.overwrite:
            raise DataError("--append and --overwrite exclude each other")
        if not self.input.paths:
            raise DataError("--input needs at least one file")
        if self.engine not in ENGINES:
            raise DataError(f"unknown --engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.engine != "spark" and (self.master or self.spark_conf):
            raise DataError("--master and --spark-conf only apply to --engine spark")


class _Phases:
    """Wall seconds per pipeline phase, recorded in the manifest (where the time goes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


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


def _connect(work: Path, cfg: ShardConfig) -> duckdb.DuckDBPyConnection:
    # In-memory database: DuckDB keeps tables in its buffer pool and spills blocks to
    # temp_directory beyond memory_limit, so input larger than RAM still works (measured faster
    # than an on-disk database file, which writes every table once more).
    con = duckdb.connect()
    spill = Path(cfg.temp_dir) if cfg.temp_dir else work / "spill"
    spill.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET memory_limit = '{cfg.memory_limit}'")
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute("SET preserve_insertion_order = true")
    if cfg.threads:
        con.execute(f"SET threads = {int(cfg.threads)}")
    return con


def _iso_ms(con: duckdb.DuckDBPyConnection, text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    value = con.execute("SELECT epoch_ms(TRY_CAST(? AS TIMESTAMPTZ))", [text]).fetchall()[0][0]
    if value is None:
        raise DataError(f"{flag} {text!r} is not an ISO 8601 time")
    return int(value)


def _previous_state(root: Path, cfg: ShardConfig) -> tuple[dict | None, int]:
    manifest_path = root / shards.MANIFEST
    if cfg.append:
        manifest = shards.load_manifest(root)
        if cfg.split is not None and manifest["split"]["strategy"] != cfg.split.strategy:
            raise DataError(
                f"{root}: the dataset uses --split {manifest['split']['strategy']}; append with the same split"
            )
        return manifest, manifest["generation"] + 1
    if manifest_path.exists() and not cfg.overwrite:
        raise DataError(f"{root} already holds a dataset; use --append to add data or --overwrite to replace it")
    return None, 1


def build(cfg: ShardConfig) -> dict:
    """Run the whole pipeline for one generation; return the new manifest."""
    started = time.time()
    root = Path(cfg.out)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    work = None
    try:
        manifest, generation = _previous_state(root, cfg)
        if manifest is not None:
            cfg.split = SplitConfig(**manifest["split"])
        cfg.split = cfg.split or SplitConfig()
        gen_name = f"g{generation:04d}"
        work = root / f".{gen_name}.tmp"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        out_dir = work / gen_name
        out_dir.mkdir()
        new_manifest = _build_generation(cfg, root, work, out_dir, manifest, generation, started)
    except BaseException:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if created and not any(root.iterdir()):  # a failed first run leaves no empty --out behind
            root.rmdir()
        raise
    _publish(root, work, gen_name, new_manifest, replace_all=cfg.overwrite)
    return new_manifest


def _build_generation(
    cfg: ShardConfig,
    root: Path,
    work: Path,
    out_dir: Path,
    manifest: dict | None,
    generation: int,
    started: float,
) -> dict:
    for p in cfg.input.paths:
        ingest.check_readable(p)
    con = _connect(work, cfg)
    engine = _engine(cfg, con, work)
    phase = _Phases()
    try:
        files = engine.stage(generation)
        phase("read_validate")
        quarantine_path = out_dir / "quarantine.jsonl"
        report = validate.write_quarantine(con, files, quarantine_path)
        phase("quarantine")
        try:
            validate.check_bad_budget(report, cfg.max_bad_fraction, root / f"rejected-g{generation:04d}.jsonl")
        except DataError:
            # Keep the rejected rows for the user to inspect; write nothing else.
            shutil.copyfile(quarantine_path, root / f"rejected-g{generation:04d}.jsonl")
            raise
        has_meta = cfg.items is not None
        if has_meta:
            items = storage.fetch_input(cfg.items, work / "inputs", len(cfg.input.paths))
            ingest.read_items_file(con, items, cfg.items_format, cfg.input.item_col)
        previous = vocab.load_vocab(root / manifest["vocab"]["dir"]) if manifest else None
        prev_users = root / manifest["vocab"]["files"]["users"] if manifest else None
        n_item_codes, n_type_codes = vocab.create_code_tables(con, previous, prev_users, *engine.seen_ids())
        logs = [str(root / g["events_log"]) for g in manifest["generations"]] if manifest else []
        total_rows = _stream_size(con, prev_users)
        num_shards = max(1, math.ceil(total_rows / cfg.events_per_shard))
        num_shards = math.ceil(num_shards / cfg.shard_multiple) * cfg.shard_multiple
        con.execute(
            f"CREATE OR REPLACE TABLE user_shards AS SELECT user, uidx, n, "
            f"(md5_number(user) % {num_shards})::INTEGER AS shard FROM user_codes"
        )
        phase("codes")
        p1 = engine.sorted_pass(logs, total_rows, num_shards, generation, n_item_codes, n_type_codes)
        phase("sort_dedup")
        num_known = previous.num_items if previous else vocab.NUM_RESERVED_ITEMS
        item_map = vocab.finalize_codes(p1.item_counts, num_known, cfg.min_item_count)
        num_known_types = previous.num_event_types if previous else vocab.NUM_RESERVED_TYPES
        type_map = vocab.finalize_codes(p1.type_counts, num_known_types, 1)
        new_vocab = vocab.build_vocab(
            con, generation, previous, item_map, p1.item_counts, type_map, p1.type_counts, has_meta
        )
        valid_ms = _iso_ms(con, cfg.split.valid_start, "--valid-start")
        test_ms = _iso_ms(con, cfg.split.test_start, "--test-start")
        phase("vocab")
        remap = {
            "item_map": item_map,
            "type_map": type_map,
            "split": cfg.split,
            "valid_ms": valid_ms,
            "test_ms": test_ms,
        }
        written = writer.write_shards(out_dir, p1, num_shards, generation, remap, mapper=engine.map_shards)
        phase("write_shards")
        user_counts = pa.table({"uidx": written["uidx"], "n_events": written["n_events"]})
        vocab_files = vocab.save_vocab(out_dir, new_vocab)
        vocab_files["users"] = _save_users(con, out_dir, prev_users, user_counts, generation)
        sources = engine.fingerprints()
        totals = con.execute(
            f"SELECT count(*), coalesce(sum(n_events), 0) FROM read_parquet('{out_dir / 'users.parquet'}') "
            f"WHERE n_events > 0"
        ).fetchall()[0]
        phase("users_fingerprints")
    finally:
        engine.close()
        con.close()
    gen_name = out_dir.name
    info = {
        "generation": generation,
        "dir": gen_name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - started, 3),
        "phase_seconds": phase.seconds,
        "sources": sources,
        "options": _options(cfg),
        "vocab_version": new_vocab.version,
        "events_log": f"{gen_name}/events/*.parquet",
        "quarantine": {**report.to_dict(), "file": f"{gen_name}/quarantine.jsonl"},
        "counts": {
            "rows_read": report.valid_rows + report.bad_rows,
            "valid_rows": report.valid_rows,
            "quarantined": report.bad_rows,
            "duplicates": p1.duplicates,
            "rare_item_events": written["rare"],
            "new_events": written["new_events"],
            "events_in_shards": int(written["n_events"].sum()),
            "users_in_shards": len(written["uidx"]),
            "new_items": int(new_vocab.num_items - (previous.num_items if previous else vocab.NUM_RESERVED_ITEMS)),
        },
        "shards": [s.to_dict() for s in written["shards"]],
    }
    generations = (manifest["generations"] if manifest else []) + [info]
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "format": "behavior-gpt/webdataset",
        "generation": generation,
        "time_unit": "ms",
        "record_dtype": [list(d) for d in shards.SEQ_DTYPE.descr],
        "index_dtype": [list(d) for d in shards.INDEX_DTYPE.descr],
        "split": cfg.split.to_dict(),
        "vocab": {
            "version": new_vocab.version,
            "dir": gen_name,
            "files": {k: f"{gen_name}/{Path(v).name}" for k, v in vocab_files.items()},
            "num_items": new_vocab.num_items,
            "num_reserved_items": vocab.NUM_RESERVED_ITEMS,
            "num_event_types": new_vocab.num_event_types,
            "event_types": new_vocab.event_types,
        },
        "totals": {
            "users": int(totals[0]),
            "events": int(totals[1]),
            "shards": sum(len(g["shards"]) for g in generations),
            "bytes": sum(s["bytes"] for g in generations for s in g["shards"]),
        },
        "generations": generations,
    }


def _options(cfg: ShardConfig) -> dict:
    options = dataclasses.asdict(cfg)
    options["input"]["paths"] = [p if storage.is_url(p) else os.path.abspath(p) for p in cfg.input.paths]
    return options


def _stream_size(con: duckdb.DuckDBPyConnection, prev_users: Path | None) -> int:
    """Events the sorted stream will carry: this generation's plus touched users' history."""
    events = con.execute("SELECT sum(n) FROM user_codes").fetchall()[0][0] or 0
    if prev_users is not None:
        events += con.execute(
            f"SELECT coalesce(sum(p.n_events), 0) FROM read_parquet('{prev_users}') p JOIN user_codes USING (uidx)"
        ).fetchall()[0][0]
    return int(events)


class DuckDBEngine:
    """The one-machine engine: every stage in the pipeline's own DuckDB connection."""

    def __init__(self, cfg: ShardConfig, con: duckdb.DuckDBPyConnection, work: Path) -> None:
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


def _engine(cfg: ShardConfig, con: duckdb.DuckDBPyConnection, work: Path):
    if cfg.engine == "spark":
        from data_sharding.spark_engine import SparkEngine

        return SparkEngine(cfg, con, work)
    return DuckDBEngine(cfg, con, work)


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


def _save_users(
    con: duckdb.DuckDBPyConnection, out_dir: Path, prev_users: Path | None, counts: pa.Table, generation: int
) -> str:
    """users.parquet: every user ever seen, with the length and generation of their latest sequence."""
    con.register("gen_counts", counts)
    prev = (
        f"SELECT uidx, user, n_events, last_generation FROM read_parquet('{prev_users}')"
        if prev_users
        else "SELECT NULL::INTEGER AS uidx, NULL::VARCHAR AS user, NULL::BIGINT AS n_events, "
        "NULL::INTEGER AS last_generation WHERE false"
    )
    path = out_dir / "users.parquet"
    con.execute(
        f"COPY (WITH prev AS ({prev}), "
        f"cur AS (SELECT c.uidx, c.user, g.n_events FROM user_codes c LEFT JOIN gen_counts g USING (uidx)) "
        f"SELECT coalesce(cur.uidx, prev.uidx) AS uidx, coalesce(cur.user, prev.user) AS user, "
        f"CASE WHEN cur.n_events IS NOT NULL THEN cur.n_events ELSE coalesce(prev.n_events, 0) END::BIGINT AS n_events, "
        f"CASE WHEN cur.n_events IS NOT NULL THEN {generation} ELSE coalesce(prev.last_generation, 0) END::INTEGER "
        f"AS last_generation FROM prev FULL OUTER JOIN cur USING (uidx) ORDER BY uidx) TO '{path}' (FORMAT parquet)"
    )
    con.unregister("gen_counts")
    return "users.parquet"


def _publish(root: Path, work: Path, gen_name: str, manifest: dict, replace_all: bool) -> None:
    """Move the finished generation into place, then atomically replace manifest.json."""
    shutil.rmtree(work / "spill", ignore_errors=True)
    if replace_all:
        trash = root / ".trash"
        shutil.rmtree(trash, ignore_errors=True)
        trash.mkdir()
        for old in root.glob("g[0-9][0-9][0-9][0-9]"):
            old.rename(trash / old.name)
    final = root / gen_name
    if final.exists():
        # A generation folder that no manifest references: left by an interrupted run.
        shutil.rmtree(final)
    (work / gen_name).rename(final)
    shutil.rmtree(work, ignore_errors=True)
    shards.write_atomic(root / shards.MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    (root / gen_name / shards.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if replace_all:
        shutil.rmtree(root / ".trash", ignore_errors=True)
