"""`bgpt train` at catalogue scale: the item table sharded (model.item_table=sharded) vs dense DDP.

    python benchmarks/catalogue_scale_bench.py                 # results/catalogue_scale.json / .md
    python benchmarks/catalogue_scale_bench.py --sizes 1000000 --steps 50   # a quick look

For each catalogue size V, a synthetic log in which every one of the V items occurs (2 V events,
users of 20 events, Parquet) is sharded with `bgpt shard --split none` (every event trains: no
validation pass over V items per query), then `bgpt launch --nproc 2` (2 gloo ranks on this
machine) trains the default scratch GPT-2 (1 x 64 here) with the sampled softmax (256 negatives,
micro batch 64) for a fixed number of steps, once with the sharded table and, where it fits, once
with the dense table (AdamW). Per-rank peak RSS is the run's own record (RUN/resources.json: the
larger rank); seconds per step are the training seconds of metrics.json over the steps (start-up
and the final checkpoint excluded). A dense run whose table, gradient and Adam state (4 copies of
V x 64 fp32 per rank) would not fit this machine's memory on 2 ranks is not started: it would be
OOM-killed, with whatever else runs. Each run alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from dist_bench import free_port
from shard_bench import REPO, machine, write_results

BENCH = REPO / "bench_data" / "catalogue_scale"
HIDDEN, EVENTS_PER_USER = 64, 20
MEMORY_GIB = 24.0


def make_data(items: int) -> Path:
    """A sharded dataset whose vocabulary holds all ``items`` (reused when it exists)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = BENCH / f"data_{items}"
    if (data / "manifest.json").exists():
        return data
    rng = np.random.default_rng(0)
    events = 2 * items - (2 * items) % EVENTS_PER_USER
    picked = np.concatenate([rng.permutation(items), rng.integers(0, items, events - items)])
    rng.shuffle(picked)
    raw = BENCH / f"raw_{items}"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    chunk = 10_000_000
    for part, start in enumerate(range(0, events, chunk)):
        idx = np.arange(start, min(events, start + chunk))
        table = pa.table(
            {
                "user": pa.array((idx // EVENTS_PER_USER).astype(np.int64)),
                "item": pa.array(picked[idx].astype(np.int64)),
                "ts": pa.array(1_600_000_000 + 60 * (idx % EVENTS_PER_USER).astype(np.int64)),
            }
        )
        pq.write_table(table, raw / f"part-{part:04d}.parquet")
    shutil.rmtree(data, ignore_errors=True)
    cmd = [sys.executable, "-m", "launch.cli", "shard", "--input", str(raw), "--out", str(data), "--split", "none"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(raw)
    return data


def dense_fits(items: int) -> bool:
    """Table + gradient + 2 Adam moments + DDP's bucket copy, fp32, 2 ranks, with 4 GiB to spare."""
    return 2 * 5 * items * HIDDEN * 4 / 2**30 + 4 <= MEMORY_GIB


def train(data: Path, table: str, steps: int) -> dict:
    run = BENCH / f"run_{data.name}_{table}"
    shutil.rmtree(run, ignore_errors=True)
    args = [
        *("--data", str(data), "--out", str(run), "--backbone", "scratch"),
        *("--model.num_layers=1", f"--model.hidden_size={HIDDEN}", f"--model.item_table={table}"),
        *("--model.item_text=none", "--heads.item_loss=sampled", "--heads.num_negatives=256"),
        *("--train.micro_batch_size=64", f"--train.max_steps={steps}", "--train.max_minutes=none"),
        *("--train.eval_every=0", "--train.log_every=10", "--checkpoint.every_steps=0"),
    ]
    cmd = [sys.executable, "-m", "launch.cli", "launch", "--nproc", "2", "--master-port", str(free_port()), "--"]
    started = time.perf_counter()
    done = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{table} run on {data} failed:\n{done.stderr[-3000:]}")
    resources = json.loads((run / "resources.json").read_text())
    seconds = json.loads((run / "metrics.json").read_text())["train"]["seconds"]
    shutil.rmtree(run)  # its checkpoints hold the table (12.8 GB per copy at 50M items)
    return {
        "peak_rss_gib": round(max(r["peak_rss_gib"] for r in resources["ranks"]), 3),
        "s_per_step": round(seconds / steps, 4),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000000,5000000,10000000,50000000")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dense-steps", type=int, default=20, help="the dense step is slow at scale: fewer steps")
    p.add_argument("--name", default="catalogue_scale")
    p.add_argument("--add", action="store_true", help="keep the sizes already in the results file")
    args = p.parse_args()
    metrics, rows = {}, []
    previous = REPO / "benchmarks" / "results" / f"{args.name}.json"
    args.command = " ".join(["python benchmarks/catalogue_scale_bench.py", *sys.argv[1:]])
    if args.add and previous.exists():
        kept = json.loads(previous.read_text())
        args.command = f"{kept['command']} && {args.command}"
        metrics = kept["metrics"]
        rows = [(int(items), run["sharded"], run["dense"]) for items, run in kept["runs"]["sizes"].items()]
    for items in [int(s) for s in args.sizes.split(",")]:
        data = make_data(items)
        sharded = train(data, "sharded", args.steps)
        dense = train(data, "dense", args.dense_steps) if dense_fits(items) else None
        tag = f"{items // 1_000_000}m"
        metrics[f"sharded_peak_rss_gib_{tag}"] = sharded["peak_rss_gib"]
        metrics[f"sharded_s_per_step_{tag}"] = sharded["s_per_step"]
        if dense is not None:
            metrics[f"dense_peak_rss_gib_{tag}"] = dense["peak_rss_gib"]
            metrics[f"dense_s_per_step_{tag}"] = dense["s_per_step"]
        rows.append((items, sharded, dense))
        print(items, sharded, dense, flush=True)
        _write(args, metrics, rows)  # after every size: a later size that fails keeps these


def _write(args, metrics: dict, rows: list) -> None:
    lines = [
        "| items | sharded peak RSS / rank (GiB) | sharded s/step | dense peak RSS / rank (GiB) | dense s/step |",
        "|---|---|---|---|---|",
    ]
    for items, sharded, dense in rows:
        d = f"{dense['peak_rss_gib']} | {dense['s_per_step']}" if dense else "not started (does not fit) | -"
        lines.append(f"| {items:,} | {sharded['peak_rss_gib']} | {sharded['s_per_step']} | {d} |")
    result = {
        "benchmark": "catalogue_scale",
        "dataset": "synthetic logs of 2 V events in which all V items occur; sizes "
        + ",".join(str(items) for items, _, _ in rows),
        "command": args.command,
        "machine": machine(),
        "metrics": metrics,
        "goal": "issue 20: bgpt train with 2 gloo ranks, hidden 64: sharded peak RSS per rank <= 0.6x dense "
        "at 10M items; 50M items train where dense cannot; step time sharded vs dense at 1M and 10M",
        "runs": {
            "steps": args.steps,
            "dense_steps": args.dense_steps,
            "sizes": {str(items): {"sharded": sharded, "dense": dense} for items, sharded, dense in rows},
        },
    }
    write_results(args.name, result, lines)


if __name__ == "__main__":
    main()
