"""`bgpt shard --engine spark`: the event-sized stages of the pipeline as Spark jobs.

What runs where (the split that keeps both engines' output identical, byte for byte):

* **Executors, one task per input file**: parse and validate the file with the same DuckDB code
  the one-machine engine uses (``ingest.stage_file`` + ``validate.file_quarantine``), write its
  valid events and its rejected rows as Parquet into the work folder. Files are the unit of
  parallelism: split one huge file into parts (data lakes usually hold many part files already).
* **Spark SQL**: the distinct items and event types and the events per user of all valid rows.
* **Driver (DuckDB, out of core)**: numbering new ids and assigning users to shards: O(items +
  users), the same SQL as the one-machine engine. Written back as Parquet for the executors.
* **Spark**: the join of events with codes and shards (plus touched users' earlier-generation
  history), one shuffle by shard and a sort by (shard, user, time, input order) within each
  partition; each partition then runs pass one (de-duplication, per-code counts, parked rows per
  shard) in its executor through Arrow batches.
* **Executors, one task per shard**: the final records, tar, index and events log of each shard
  (``writer._write_one_shard``), once the driver has fixed the vocabulary.

On a cluster the work folder and ``--out`` must be on a filesystem every executor and the driver
see at the same path (NFS, Lustre, a FUSE mount of the bucket); the finished dataset can then be
copied to object storage as is. Executors need this package installed (or shipped with
``--py-files``).
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import sys
import tempfile
from functools import partial
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_sharding import ingest, sequences, staging, storage, validate
from data_sharding.errors import DataError

_COUNTS_SCHEMA = "kind string, key long, count long"


def _spark_memory(limit: str) -> str:
    """DuckDB-style '3GB' -> Spark-style '3g'."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)i?B?\s*", limit, re.IGNORECASE)
    if not match:
        raise DataError(f"--memory-limit {limit!r}: expected a size such as 3GB")
    return f"{match.group(1)}{(match.group(2) or 'm').lower()}"


def session(master: str | None, conf: dict[str, str], temp_dir: str | None, memory: str):
    """The running Spark session (spark-submit's, or an earlier build's in this process), or a new one
    (``local[*]`` unless ``master`` says otherwise; scratch files under ``temp_dir``)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError(
            "--engine spark needs pyspark: pip install 'behavior-gpt[spark]' (and Java 17 on the PATH)"
        ) from None
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise DataError("--engine spark needs Java 17: install it (Debian: openjdk-17-jre-headless) or set JAVA_HOME")
    # Python workers must run this interpreter (with this package and its dependencies).
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    if os.environ.get("PYSPARK_GATEWAY_PORT") and master is None:
        # Started by spark-submit: its --master, --conf and memory settings already rule the JVM.
        builder = SparkSession.builder.appName("bgpt-shard")
        for key, value in conf.items():
            builder = builder.config(key, value)
        spark = builder.getOrCreate()
        spark.sparkContext.setLogLevel("WARN")
        return spark
    master = master or "local[*]"
    if master.startswith("local"):
        # One machine: bind to loopback, spill under temp_dir (through the environment: Spark warns
        # about spark.local.dir because cluster managers override it).
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        os.environ["SPARK_LOCAL_DIRS"] = str(_local_dir(temp_dir))
    builder = (
        SparkSession.builder.appName("bgpt-shard")
        .master(master)
        .config("spark.ui.showConsoleProgress", "true")
        .config("spark.driver.memory", memory)
        # Pass one wants big Arrow batches: its per-batch cost includes a bincount over all codes.
        .config("spark.sql.execution.arrow.maxRecordsPerBatch", "500000")
        .config("spark.sql.session.timeZone", "UTC")
    )
    for key, value in conf.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


def _local_dir(temp_dir: str | None) -> Path:
    """Spark's scratch folder for this process: it outlives one build (the session is reused), so it
    cannot live in a generation's work folder. Inside --temp-dir when given, else the system's."""
    base = Path(temp_dir) if temp_dir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="bgpt-spark-", dir=base))
    atexit.register(shutil.rmtree, path, True)
    return path


def _stage_file_task(
    job: tuple[int, str, str], cfg: ingest.InputConfig, generation: int, staged: str, memory_limit: str, threads: int
) -> tuple[str | None, int, dict | None]:
    """Executor side: stage one input file with DuckDB; write valid rows and rejected rows as Parquet.

    ``job`` is (file index, absolute path or URL to read, the name the user gave it: errors and
    quarantine rows use that name, like the one-machine engine). Returns (error message or None,
    valid rows, fingerprint). Errors come back as text so the driver raises the same one-line
    DataError the one-machine engine would (and Spark does not retry a file that cannot be read).
    The file's sha256 is computed here too, so no single machine reads every input byte.
    """
    index, source, given = job
    scratch = Path(tempfile.mkdtemp(prefix="bgpt-input-"))
    con = duckdb.connect()
    try:
        path = storage.fetch_input(source, scratch, index)
        con.execute(f"SET threads = {max(1, min(threads, os.cpu_count() or 1))}")
        con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute("SET preserve_insertion_order = true")
        events = Path(staged) / f"events-{index:06d}.parquet"
        try:
            fq = staging.stage_to_parquet(con, index, path, cfg, generation, events).named(given)
        except DataError as e:
            return str(e).replace(path, given), 0, None
        pq.write_table(fq.rows, Path(staged) / f"quarantine-{index:06d}.parquet")
        return None, fq.valid_rows, storage.fingerprint_input(source, path)
    finally:
        con.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _pass_one_partition(batches, work: str, generation: int, n_items: int, n_types: int):
    """Executor side: pass one over one sorted partition; yields sparse counts and the parked shards."""
    p1 = sequences.pass_one(batches, Path(work), generation, n_items, n_types, tqdm(disable=True))
    item_codes = np.flatnonzero(p1.item_counts)
    type_codes = np.flatnonzero(p1.type_counts)
    shard_ids = np.array(sorted(p1.shard_files), dtype=np.int64)
    kinds = ["item"] * len(item_codes) + ["type"] * len(type_codes) + ["file"] * len(shard_ids) + ["dup"]
    keys = np.concatenate([item_codes, type_codes, shard_ids, [0]]).astype(np.int64)
    counts = np.concatenate(
        [p1.item_counts[item_codes], p1.type_counts[type_codes], np.zeros(len(shard_ids)), [p1.duplicates]]
    ).astype(np.int64)
    yield pa.RecordBatch.from_pydict({"kind": kinds, "key": keys, "count": counts})


def _spark_map(spark, fn, jobs: list) -> list:
    """``[fn(*job) for job in jobs]`` as one Spark task per job, results in job order."""
    if not jobs:
        return []
    return spark.sparkContext.parallelize(jobs, len(jobs)).map(lambda job: fn(*job)).collect()


class SparkEngine:
    """The pipeline's engine interface (see ``duckdb_engine.DuckDBEngine``) on a Spark session."""

    def __init__(self, cfg, con: duckdb.DuckDBPyConnection, work: Path) -> None:
        self.cfg, self.con, self.work = cfg, con, work.resolve()
        self.spark = session(cfg.master, cfg.spark_conf, cfg.temp_dir, _spark_memory(cfg.memory_limit))
        self.events = None
        self._fingerprints: list[dict] = []

    # -- stage: one task per input file -------------------------------------------------------
    def stage(self, generation: int) -> list[validate.FileQuarantine]:
        staged = self.work / "staged"
        staged.mkdir()
        jobs = [(i, p if storage.is_url(p) else os.path.abspath(p), p) for i, p in enumerate(self.cfg.input.paths)]
        task = partial(
            _stage_file_task,
            cfg=self.cfg.input,
            generation=generation,
            staged=str(staged),
            memory_limit=self.cfg.memory_limit,
            # Fewer files than task slots: let each file's DuckDB use the idle slots' cores.
            threads=max(1, self.spark.sparkContext.defaultParallelism // len(jobs)),
        )
        files = []
        for (index, _, given), (error, valid, fingerprint) in zip(
            jobs, _spark_map(self.spark, task, [(job,) for job in jobs]), strict=True
        ):
            if error:
                raise DataError(error)
            rows = pq.read_table(staged / f"quarantine-{index:06d}.parquet")
            files.append(validate.FileQuarantine(given, rows, valid))
            self._fingerprints.append(fingerprint)
        staged_files = (str(staged / f"events-{index:06d}.parquet") for index, _, _ in jobs)
        self.events = self.spark.read.parquet(*staged_files).where("reason IS NULL").drop("reason", "raw")
        return files

    # -- distinct ids, aggregated by Spark, numbered by the driver -----------------------------
    def seen_ids(self) -> tuple[str, str, str]:
        from pyspark.sql import functions as F

        seen = self.work / "seen"
        self.events.select("item").distinct().write.parquet(str(seen / "items"))
        self.events.select("event_type").distinct().write.parquet(str(seen / "types"))
        self.events.groupBy("user").agg(F.count(F.lit(1)).alias("n")).write.parquet(str(seen / "users"))
        return tuple(f"read_parquet('{seen / name}/*.parquet')" for name in ("items", "types", "users"))

    # -- the big shuffle + sort and pass one in executors --------------------------------------
    def sorted_pass(
        self, logs: list[str], total_rows: int, num_shards: int, generation: int, n_items: int, n_types: int
    ) -> sequences.PassOneResult:
        from pyspark.sql import functions as F

        codes = self.work / "codes"
        codes.mkdir()
        for table in ("user_shards", "item_codes", "type_codes"):
            self.con.execute(f"COPY {table} TO '{codes / table}.parquet' (FORMAT parquet)")
        read = self.spark.read.parquet
        users = read(str(codes / "user_shards.parquet")).select("user", "uidx", "shard")
        item_codes = read(str(codes / "item_codes.parquet")).select(F.col("key").alias("item"), F.col("code"))
        type_codes = read(str(codes / "type_codes.parquet")).select(
            F.col("key").alias("event_type"), F.col("code").alias("type_code")
        )
        new = (
            self.events.join(users, "user")
            .join(item_codes, "item")
            .join(F.broadcast(type_codes), "event_type")
            .select(
                F.col("shard").cast("int"),
                F.col("uidx").cast("int"),
                "ts",
                "ord",
                F.col("code").cast("int").alias("item"),
                F.col("type_code").cast("short").alias("type"),
                "value",
            )
        )
        if logs:
            files = sorted(f for pattern in logs for f in glob.glob(pattern))
            history = read(*files).join(users.select("uidx", "shard"), "uidx")
            new = new.unionByName(history.select(*new.columns))
        # One partition per shard on average (hashing puts some shards together, leaves some empty).
        ordered = new.repartition(num_shards, "shard").sortWithinPartitions("shard", "uidx", "ts", "ord")
        work, gen = str(self.work), generation
        rows = ordered.mapInArrow(
            lambda batches: _pass_one_partition(batches, work, gen, n_items, n_types), _COUNTS_SCHEMA
        ).collect()
        item_counts = np.zeros(n_items, dtype=np.int64)
        type_counts = np.zeros(n_types, dtype=np.int64)
        files: dict[int, Path] = {}
        duplicates = 0
        for kind, key, count in rows:
            if kind == "item":
                item_counts[key] += count
            elif kind == "type":
                type_counts[key] += count
            elif kind == "file":
                files[int(key)] = self.work / f"sorted-{key:06d}.npy"
            else:
                duplicates += count
        return sequences.PassOneResult(dict(sorted(files.items())), item_counts, type_counts, duplicates)

    # -- one task per shard ---------------------------------------------------------------------
    def map_shards(self, fn, jobs: list) -> list:
        return _spark_map(self.spark, fn, jobs)

    def fingerprints(self) -> list[dict]:
        """Path, bytes and sha256 of every input, as the staging tasks computed them."""
        return self._fingerprints

    def close(self) -> None:
        # The session stays up for later builds in this process (starting a JVM costs seconds);
        # it ends with the process, or with spark-submit's own lifecycle.
        self.events = None
