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
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from data_sharding import layouts, sequences, shards, staging, storage, validate, vocab, writer
from data_sharding.duckdb_engine import DuckDBEngine, memory_bytes
from data_sharding.errors import DataError
from data_sharding.ingest import InputConfig
from data_sharding.items_file import ItemsConfig, read_items_file
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
    items_options: ItemsConfig = field(default_factory=ItemsConfig)
    """How to read the items file (format, which columns are the id, title and attributes)."""
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
        memory_bytes(self.memory_limit)  # a clear error for a limit that is not a size
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
    """Build generation ``generation`` into ``out_dir``; return the manifest that lists it."""
    cfg.input.paths = storage.expand_inputs(cfg.input.paths)
    for p in cfg.input.paths:
        layouts.check_readable(p)
    staging.check_disk(cfg.input.paths, cfg.input.format, root)
    con = _connect(work, cfg)
    engine = _engine(cfg, con, work)
    phase = _Phases()
    try:
        report = _read_inputs(cfg, con, engine, root, work, out_dir, generation, phase)
        previous = vocab.load_vocab(root / manifest["vocab"]["dir"]) if manifest else None
        prev_users = root / manifest["vocab"]["files"]["users"] if manifest else None
        n_item_codes, n_type_codes = vocab.create_code_tables(con, previous, prev_users, *engine.seen_ids())
        logs = [str(root / g["events_log"]) for g in manifest["generations"]] if manifest else []
        total_rows = _stream_size(con, prev_users)
        num_shards = _assign_shards(con, cfg, total_rows)
        phase("codes")
        p1 = engine.sorted_pass(logs, total_rows, num_shards, generation, n_item_codes, n_type_codes)
        phase("sort_dedup")
        phase.seconds.update(getattr(engine, "sub_phases", {}))
        new_vocab, remap = _final_vocab(con, cfg, generation, previous, p1)
        phase("vocab")
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
    entry = shards.generation_entry(
        generation=generation,
        gen_dir=out_dir.name,
        seconds=round(time.time() - started, 3),
        phase_seconds=phase.seconds,
        sources=sources,
        options=_options(cfg),
        vocab_version=new_vocab.version,
        quarantine=report.to_dict(),
        counts=_counts(report, p1, written, new_vocab, previous),
        shard_list=written["shards"],
    )
    vocab_entry = vocab.manifest_entry(new_vocab, out_dir.name, vocab_files)
    return shards.build_manifest(manifest, entry, cfg.split.to_dict(), vocab_entry, totals)


def _read_inputs(
    cfg: ShardConfig,
    con: duckdb.DuckDBPyConnection,
    engine,
    root: Path,
    work: Path,
    out_dir: Path,
    generation: int,
    phase: _Phases,
) -> validate.QuarantineReport:
    """Parse and validate the inputs, quarantine bad rows (refusing the run over the budget), read the items file."""
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
    if cfg.items is not None:
        items = storage.fetch_input(cfg.items, work / "inputs", len(cfg.input.paths))
        read_items_file(con, items, cfg.items_options, cfg.input.item_col)
    return report


def _assign_shards(con: duckdb.DuckDBPyConnection, cfg: ShardConfig, total_rows: int) -> int:
    """Hash every user of the generation to a shard (table ``user_shards``); return the shard count."""
    num_shards = max(1, math.ceil(total_rows / cfg.events_per_shard))
    num_shards = math.ceil(num_shards / cfg.shard_multiple) * cfg.shard_multiple
    con.execute(
        f"CREATE OR REPLACE TABLE user_shards AS SELECT user, uidx, n, "
        f"(md5_number(user) % {num_shards})::INTEGER AS shard FROM user_codes"
    )
    return num_shards


def _final_vocab(
    con: duckdb.DuckDBPyConnection,
    cfg: ShardConfig,
    generation: int,
    previous: vocab.Vocab | None,
    p1: sequences.PassOneResult,
) -> tuple[vocab.Vocab, dict]:
    """The generation's vocabulary, and how pass two maps codes and marks splits (``writer.write_shards``)."""
    num_known = previous.num_items if previous else vocab.NUM_RESERVED_ITEMS
    item_map = vocab.finalize_codes(p1.item_counts, num_known, cfg.min_item_count)
    num_known_types = previous.num_event_types if previous else vocab.NUM_RESERVED_TYPES
    type_map = vocab.finalize_codes(p1.type_counts, num_known_types, 1)
    new_vocab = vocab.build_vocab(
        con, generation, previous, item_map, p1.item_counts, type_map, p1.type_counts, cfg.items is not None
    )
    remap = {
        "item_map": item_map,
        "type_map": type_map,
        "split": cfg.split,
        "valid_ms": _iso_ms(con, cfg.split.valid_start, "--valid-start"),
        "test_ms": _iso_ms(con, cfg.split.test_start, "--test-start"),
    }
    return new_vocab, remap


def _counts(
    report: validate.QuarantineReport,
    p1: sequences.PassOneResult,
    written: dict,
    new_vocab: vocab.Vocab,
    previous: vocab.Vocab | None,
) -> dict:
    """The generation's event counts, stage by stage, for the manifest."""
    return {
        "rows_read": report.valid_rows + report.bad_rows,
        "valid_rows": report.valid_rows,
        "quarantined": report.bad_rows,
        "duplicates": p1.duplicates,
        "rare_item_events": written["rare"],
        "new_events": written["new_events"],
        "events_in_shards": int(written["n_events"].sum()),
        "users_in_shards": len(written["uidx"]),
        "new_items": int(new_vocab.num_items - (previous.num_items if previous else vocab.NUM_RESERVED_ITEMS)),
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


def _engine(cfg: ShardConfig, con: duckdb.DuckDBPyConnection, work: Path):
    if cfg.engine == "spark":
        from data_sharding.spark_engine import SparkEngine

        return SparkEngine(cfg, con, work)
    return DuckDBEngine(cfg, con, work)


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
