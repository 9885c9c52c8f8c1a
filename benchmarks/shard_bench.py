"""End-to-end sharding benchmark: read -> validate -> de-duplicate -> sort -> shards + manifest.

Runs `bgpt shard` in a child process and reports events/s (rows read / wall seconds) and the
child's peak RSS. Writes benchmarks/results/shard_<name>.json and .md.

    python benchmarks/shard_bench.py synth --events 10000000      # -> shard_synth_10m
    python benchmarks/shard_bench.py synth --events 100000000     # -> shard_synth_100m
    python benchmarks/shard_bench.py ml1m                          # ../shared/data/ml-1m
    python benchmarks/shard_bench.py sports                        # ../shared/data/amazon-sports

Parquet part files as `bgpt synth --parts` writes them (issue 21: 100M and 1B events):

    python benchmarks/shard_bench.py synth --events 100000000 --input-format parquet --parts 10 \
        --name shard_synth_100m_parquet
    python benchmarks/shard_bench.py synth --events 1000000000 --input-format parquet --parts 100 \
        --name shard_synth_1b --verify --delete-input

Engines on the same input (the 100M CSV split into 8 part files, as a data lake holds it):

    python benchmarks/shard_bench.py synth --events 100000000 --parts 8 --name duckdb_100m
    python benchmarks/shard_bench.py synth --events 100000000 --parts 8 --name spark_100m \
        --engine spark --master 'local[2]'

Peak disk is the peak growth of the used bytes of the file system holding bench_data/ while the
child runs (staged and coded scratch, parked rows, shards: sampled every second).
Peak memory is the peak of the summed RSS of the whole process tree (sampled every 0.2 s, and never
below the main process's own peak from wait4): Spark's JVM and its Python workers are children.

Synthetic inputs are generated once into bench_data/ (git-ignored) with `bgpt synth`
(users = events / 50, items = events / 1000, at least 1,000).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
BGPT = [sys.executable, "-m", "launch.cli"]
GOAL = ">= 1,000,000 events/s at 100M events on 2 cores; peak RSS <= 4 GiB and within 1.5x from 10M to 100M"
SCALE_GOAL = "issue 21: >= 1,000,000 events/s on 2 cores, peak RSS <= 4 GiB at 100M and at 1B (1B within 1.2x of 100M)"
ENGINE_GOAL = (
    "issue 8: DuckDB and Spark local[2] on the same 100M events in part files write identical shards; "
    "time, peak memory and bytes in/out are the basis of the 1B/10B plan (benchmarks/README.md)"
)


def write_results(name: str, result: dict, markdown: list[str]) -> None:
    """benchmarks/results/<name>.json (the result object) and <name>.md (the table lines)."""
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text("\n".join(markdown) + "\n")


class TreeRss(threading.Thread):
    """Peak of the summed resident memory of a process and all its descendants, sampled."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.NoSuchProcess):
                        total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                return
            self.peak = max(self.peak, total)
            self.stop.wait(self.every)


class DiskPeak(threading.Thread):
    """Peak growth of the used bytes of the file system holding ``path``, sampled."""

    def __init__(self, path: Path, every: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.path, self.every, self.stop = path, every, threading.Event()
        self.start_used = shutil.disk_usage(path).used
        self.peak = 0

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, shutil.disk_usage(self.path).used - self.start_used)
            self.stop.wait(self.every)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def human(n: int) -> str:
    return f"{n // 1_000_000}m" if n % 1_000_000 == 0 else f"{n // 1000}k"


def split_csv(path: Path, parts: int) -> list[Path]:
    """The CSV as ``parts`` files of about equal size, each with the header (made once, then reused)."""
    folder = path.parent / f"parts{parts}"
    files = [folder / f"part-{i:03d}.csv" for i in range(parts)]
    if all(f.exists() for f in files):
        return files
    folder.mkdir(exist_ok=True)
    size = path.stat().st_size
    with open(path, "rb") as src:
        header = src.readline()
        for i, target in enumerate(files):
            tmp = target.with_suffix(".tmp")
            with open(tmp, "wb") as out:
                out.write(header)
                end = size * (i + 1) // parts
                while src.tell() < end or i == parts - 1:
                    block = src.readlines(1 << 24)
                    if not block:
                        break
                    out.writelines(block)
            tmp.replace(target)
    return files


def prepare(args: argparse.Namespace) -> tuple[str, list[str], str]:
    """(result name, shard arguments, dataset description)."""
    if args.dataset == "synth":
        parquet = args.input_format == "parquet"
        data = REPO / "bench_data" / f"synth_{human(args.events)}{'_pq' if parquet else ''}"
        events = data / ("events" if parquet else "events.csv")
        if not events.exists():
            data.mkdir(parents=True, exist_ok=True)
            users, items = args.events // 50, max(1_000, args.events // 1000)
            cmd = [*BGPT, "synth", "--events", str(args.events), "--users", str(users), "--items", str(items)]
            parts = ["--parts", str(args.parts)] if parquet else []
            subprocess.run([*cmd, *parts, "--out", str(events)], check=True, cwd=REPO)
        if parquet:
            size = sum(f.stat().st_size for f in events.glob("*.parquet"))
            desc = f"bgpt synth --events {args.events} --parts {args.parts} (Parquet, {size / 2**30:.2f} GiB)"
            shard_args = ["--input", str(events), "--items", str(data / "items.parquet")]
            return f"synth_{human(args.events)}_parquet", shard_args, desc
        desc = f"bgpt synth --events {args.events} (CSV, {events.stat().st_size / 2**30:.2f} GiB)"
        inputs = [events]
        if args.parts > 1:
            inputs = split_csv(events, args.parts)
            desc = desc[:-1] + f", split into {args.parts} part files)"
        shard_args = ["--input", *map(str, inputs), "--items", str(data / "items.csv")]
        return f"synth_{human(args.events)}", shard_args, desc
    if args.dataset == "ml1m":
        ratings = SHARED / "ml-1m" / "ratings_users_0001-2999.dat"
        items = SHARED / "ml-1m" / "movies.dat"
        if not ratings.exists():
            sys.exit(f"{ratings} not found: the real datasets live in ../shared/data")
        shard_args = ["--input", str(ratings), "--format", "movielens", "--items", str(items)]
        return "ml1m", [*shard_args, "--items-format", "movielens"], "MovieLens-1M users 1-2999 (487,650 ratings)"
    interactions = SHARED / "amazon-sports" / "interactions.csv"
    if not interactions.exists():
        sys.exit(f"{interactions} not found: the real datasets live in ../shared/data")
    return "sports", ["--input", str(interactions)], "Amazon Sports and Outdoors 5-core (296,337 reviews)"


def verify(out: Path) -> dict:
    """`bgpt inspect --verify` (re-hashes every shard) and the streaming loader over a sample of shards."""
    started = time.perf_counter()
    subprocess.run([*BGPT, "inspect", str(out), "--verify"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    verify_s = time.perf_counter() - started
    code = (
        "import sys, itertools, time; from data_sharding.loader import StreamLoader\n"
        "from data_sharding.stream import ShardDataset, StreamConfig\n"
        "ds = ShardDataset(sys.argv[1], StreamConfig(max_len=50, batch_size=256, seed=0))\n"
        "t = time.perf_counter(); n = sum(int(b['mask'].sum()) for b in itertools.islice(StreamLoader(ds), 200))\n"
        "print(n, time.perf_counter() - t)"
    )
    line = subprocess.run([sys.executable, "-c", code, str(out)], check=True, cwd=REPO, capture_output=True, text=True)
    events, seconds = line.stdout.split()
    return {
        "verify_s": round(verify_s, 1),
        "loader_sample_events": int(events),
        "loader_sample_s": round(float(seconds), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("synth", "ml1m", "sports"))
    parser.add_argument("--events", type=int, default=10_000_000, help="synthetic events")
    parser.add_argument("--memory-limit", default="3GB")
    parser.add_argument("--events-per-shard", type=int, default=2_000_000)
    parser.add_argument("--parts", type=int, default=1, help="split a synthetic CSV into this many files")
    parser.add_argument("--input-format", default="csv", choices=("csv", "parquet"), help="synthetic input")
    parser.add_argument("--verify", action="store_true", help="then run bgpt inspect --verify and stream shards")
    parser.add_argument("--delete-input", action="store_true", help="delete the synthetic input afterwards")
    parser.add_argument("--engine", default="duckdb", choices=("duckdb", "spark"))
    parser.add_argument("--master", help="Spark master (engine spark)")
    parser.add_argument("--name", help="result name (default: shard_<dataset>)")
    args = parser.parse_args()
    name, shard_args, desc = prepare(args)
    name = args.name or f"shard_{name}"
    out = REPO / "bench_data" / f"shards_{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*BGPT, "shard", *shard_args, "--out", str(out), "--memory-limit", args.memory_limit]
    cmd += ["--events-per-shard", str(args.events_per_shard), "--engine", args.engine]
    if args.master:
        cmd += ["--master", args.master]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    sampler, disk = TreeRss(child.pid), DiskPeak(out.parent)
    sampler.start()
    disk.start()
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not earlier children's
    seconds = time.perf_counter() - started
    for thread in (sampler, disk):
        thread.stop.set()
        thread.join()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bgpt shard failed: {' '.join(cmd)}")
    peak_gib = max(usage.ru_maxrss * 1024, sampler.peak) / 2**30  # KiB -> GiB
    manifest = json.loads((out / "manifest.json").read_text())
    gen = manifest["generations"][0]
    rows = gen["counts"]["rows_read"]
    in_bytes = sum(s["bytes"] for s in gen["sources"])
    out_bytes = sum(s["bytes"] for s in gen["shards"])
    result = {
        "benchmark": "shard" if args.engine == "duckdb" else f"shard --engine spark --master {args.master}",
        "dataset": desc,
        "command": "python benchmarks/shard_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "metrics": {
            "events": rows,
            "events_per_s": round(rows / seconds),
            "peak_rss_gib": round(peak_gib, 3),
            "seconds": round(seconds, 2),
            "events_in_shards": gen["counts"]["events_in_shards"],
            "users": gen["counts"]["users_in_shards"],
            "shards": len(gen["shards"]),
            "bytes_in": in_bytes,
            "bytes_out": out_bytes,
            "input_gib": round(in_bytes / 2**30, 3),
            "shard_gib": round(out_bytes / 2**30, 3),
            "quarantined": gen["counts"]["quarantined"],
            "duplicates": gen["counts"]["duplicates"],
            "disk_peak_gib": round(disk.peak / 2**30, 2),
            "disk_out_gib": round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30, 2),
            **{f"phase_{k}_s": v for k, v in gen["phase_seconds"].items()},
        },
        "goal": SCALE_GOAL if args.input_format == "parquet" else GOAL if args.parts == 1 else ENGINE_GOAL,
    }
    if args.verify:
        result["metrics"].update(verify(out))
    if args.delete_input and args.dataset == "synth":
        shutil.rmtree(REPO / "bench_data" / f"synth_{human(args.events)}_pq", ignore_errors=True)
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in gen["phase_seconds"].items())
    markdown = [
        f"# {result['benchmark']}: {desc}",
        "",
        f"`{result['command']}` on {result['machine']}",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:,} |" for k, v in result["metrics"].items()),
        "",
        f"Phases: {phases}.",
    ]
    write_results(name, result, markdown)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
