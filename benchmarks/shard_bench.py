"""End-to-end sharding benchmark: read -> validate -> de-duplicate -> sort -> shards + manifest.

Runs `bgpt shard` in a child process and reports events/s (rows read / wall seconds) and the
child's peak RSS. Writes benchmarks/results/shard_<name>.json and .md.

    python benchmarks/shard_bench.py synth --events 10000000      # -> shard_synth_10m
    python benchmarks/shard_bench.py synth --events 100000000     # -> shard_synth_100m
    python benchmarks/shard_bench.py ml1m                          # ../shared/data/ml-1m
    python benchmarks/shard_bench.py sports                        # ../shared/data/amazon-sports

Synthetic inputs are generated once into bench_data/ (git-ignored) with `bgpt synth`
(users = events / 50, items = events / 1000, at least 1,000).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
BGPT = [sys.executable, "-m", "launch.cli"]


def write_results(name: str, result: dict, markdown: list[str]) -> None:
    """benchmarks/results/<name>.json (the result object) and <name>.md (the table lines)."""
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (results / f"{name}.md").write_text("\n".join(markdown) + "\n")


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


def prepare(args: argparse.Namespace) -> tuple[str, list[str], str]:
    """(result name, shard arguments, dataset description)."""
    if args.dataset == "synth":
        data = REPO / "bench_data" / f"synth_{human(args.events)}"
        events = data / "events.csv"
        if not events.exists():
            data.mkdir(parents=True, exist_ok=True)
            users, items = args.events // 50, max(1_000, args.events // 1000)
            cmd = [*BGPT, "synth", "--events", str(args.events), "--users", str(users), "--items", str(items)]
            subprocess.run([*cmd, "--out", str(events)], check=True, cwd=REPO)
        desc = f"bgpt synth --events {args.events} (CSV, {events.stat().st_size / 2**30:.2f} GiB)"
        return f"synth_{human(args.events)}", ["--input", str(events), "--items", str(data / "items.csv")], desc
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("synth", "ml1m", "sports"))
    parser.add_argument("--events", type=int, default=10_000_000, help="synthetic events")
    parser.add_argument("--memory-limit", default="3GB")
    parser.add_argument("--events-per-shard", type=int, default=2_000_000)
    args = parser.parse_args()
    name, shard_args, desc = prepare(args)
    out = REPO / "bench_data" / f"shards_{name}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*BGPT, "shard", *shard_args, "--out", str(out), "--memory-limit", args.memory_limit]
    cmd += ["--events-per-shard", str(args.events_per_shard)]
    started = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS, not earlier children's
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bgpt shard failed: {' '.join(cmd)}")
    peak_gib = usage.ru_maxrss / 2**20  # KiB -> GiB
    manifest = json.loads((out / "manifest.json").read_text())
    gen = manifest["generations"][0]
    rows = gen["counts"]["rows_read"]
    in_bytes = sum(s["bytes"] for s in gen["sources"])
    out_bytes = sum(s["bytes"] for s in gen["shards"])
    result = {
        "benchmark": "shard",
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
            "input_gib": round(in_bytes / 2**30, 3),
            "shard_gib": round(out_bytes / 2**30, 3),
            "quarantined": gen["counts"]["quarantined"],
            "duplicates": gen["counts"]["duplicates"],
        },
        "goal": ">= 1,000,000 events/s at 100M events on 2 cores; peak RSS <= 4 GiB and within 1.5x from 10M to 100M",
    }
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"shard_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = "\n".join(f"| {k} | {v:,} |" for k, v in result["metrics"].items())
    (results / f"shard_{name}.md").write_text(
        f"# shard: {desc}\n\n`{result['command']}` on {result['machine']}\n\n| metric | value |\n|---|---|\n{table}\n"
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
