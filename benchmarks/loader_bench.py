"""Loader throughput: the streaming loader alone (no model) against what training consumes.

    python benchmarks/loader_bench.py      # needs bench_data/shards_synth_10m (python benchmarks/shard_bench.py synth --events 10000000)

Reads training windows (max_len 50, batch 128) from the 10M-event synthetic dataset for a fixed
time with 0, 1 and 2 loader worker processes, from the folder and through an fsspec ``file://``
URL, and reports samples/s and target tokens/s (events predicted). Training's consumption is
taken from benchmarks/results/train_speed_configs.json (measured on the same machine). Writes
benchmarks/results/loader.json and loader.md.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_bench import REPO, machine, write_results  # noqa: E402

DATA = REPO / "bench_data" / "shards_synth_10m"
SECONDS = 20.0


def measure(root, workers: int) -> dict:
    from data_sharding.loader import StreamLoader
    from data_sharding.stream import ShardDataset, StreamConfig

    loader = StreamLoader(ShardDataset(root, StreamConfig(max_len=50, batch_size=128)), num_workers=workers)
    samples = targets = 0
    started = time.perf_counter()
    first = None
    for batch in loader:
        if first is None:
            first = time.perf_counter() - started  # start-up: index files, worker start
            started = time.perf_counter()
            continue
        samples += len(batch["users"])
        targets += int((batch["mask"][:, 1:] & batch["targets"][:, 1:]).sum())
        if time.perf_counter() - started > SECONDS:
            break
    elapsed = time.perf_counter() - started
    return {
        "samples_per_s": round(samples / elapsed, 1),
        "tokens_per_s": round(targets / elapsed, 1),
        "first_batch_s": round(first, 2),
    }


def main() -> None:
    if not (DATA / "manifest.json").exists():
        sys.exit(f"{DATA} is missing: python benchmarks/shard_bench.py synth --events 10000000")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for source, root in (("folder", DATA), ("file_url", f"file://{DATA}")):
        for workers in (0, 1, 2):
            results[f"{source}_w{workers}"] = measure(root, workers)
            print(source, workers, results[f"{source}_w{workers}"], flush=True)
    speed = json.loads((REPO / "benchmarks" / "results" / "train_speed_configs.json").read_text())["metrics"]
    consumption = {k: v for k, v in speed.items() if k.endswith("tokens_per_s")}
    metrics = {f"{k}_{f}": v for k, r in results.items() for f, v in r.items()}
    metrics.update({f"train_{k}": v for k, v in consumption.items()})
    best = max(r["tokens_per_s"] for r in results.values())
    metrics["tokens_per_s"] = best
    metrics["headroom_vs_fastest_training"] = round(best / max(consumption.values()), 1)
    out = {
        "benchmark": "loader",
        "dataset": "synthetic 10M events, 200k users, 5 shards (bench_data/shards_synth_10m)",
        "command": "python benchmarks/loader_bench.py",
        "machine": machine(),
        "metrics": metrics,
        "goal": "the loader alone must deliver more target tokens/s than training consumes",
    }
    lines = [
        "# loader: streaming loader alone vs training consumption (2 CPU cores)",
        "",
        f"`{out['command']}` on {out['machine']}; windows of 50, batch 128, {SECONDS:.0f} s per row",
        "",
        "| source | loader workers | samples/s | target tokens/s | first batch s |",
        "|---|---|---|---|---|",
    ]
    for key, r in results.items():
        source, workers = key.rsplit("_w", 1)
        lines.append(f"| {source} | {workers} | {r['samples_per_s']} | {r['tokens_per_s']} | {r['first_batch_s']} |")
    lines += ["", "Training consumption (benchmarks/results/train_speed_configs.json, same machine):", ""]
    lines += ["| config | tokens/s |", "|---|---|"] + [f"| {k} | {v} |" for k, v in consumption.items()]
    write_results("loader", out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
