"""Distributed training on this machine: throughput of 1 vs 2 processes (DDP, ZeRO-1/2/3) and peak
memory per rank of full fine-tuning under DDP vs ZeRO-1/2/3.

    python benchmarks/dist_bench.py            # writes benchmarks/results/distributed.json / .md

Every configuration is a real `bgpt train` / `bgpt launch` run on a synthetic log (the data is
not the point; cheap evaluation is). Throughput: SmolLM2 first 4 blocks with LoRA, global batch
16 windows of 50 events (1 process accumulates 2 micro batches of 8; 2 processes take 8 each),
median targets/s over the steps after the first 3. Memory: SmolLM2 (all 30 blocks) fully
fine-tuned for 3 steps, peak RSS of every rank from RUN/resources.json. On CPU, 2 processes
share the same 2 cores that 1 process uses with 2 threads (torchrun gives each 1 thread).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from shard_bench import REPO, machine

BGPT = [sys.executable, "-m", "launch.cli"]
RESULTS = REPO / "benchmarks" / "results"
WORK = REPO / "bench_data" / "dist"
FRESH = False


def data(users: int, name: str) -> Path:
    out = WORK / name
    if not (out / "manifest.json").exists():
        raw = WORK / f"{name}_raw" / "events.csv"
        subprocess.run(
            [*BGPT, "synth", "--events", str(users * 25), "--users", str(users), "--items", "2000", "--out", str(raw)],
            check=True,
            cwd=REPO,
        )
        subprocess.run([*BGPT, "shard", "--input", str(raw), "--out", str(out), "--overwrite"], check=True, cwd=REPO)
    return out


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(strategy: str, nproc: int, args: list[str], out: Path) -> float:
    """Train one configuration (reusing a finished run of the same command: --fresh redoes all)."""
    done_file = out / "bench_run.json"
    if not FRESH and done_file.exists() and json.loads(done_file.read_text())["args"] == [strategy, nproc, *args]:
        return json.loads(done_file.read_text())["wall_s"]
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if nproc == 1 and strategy == "single":
        cmd = [*BGPT, "train", "--out", str(out), *args]
    else:
        launch = ["launch", "--nproc", str(nproc), "--strategy", strategy, "--master-port", free_port()]
        cmd = [*BGPT, *launch, "--", "--out", str(out), *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")
    wall = time.perf_counter() - start
    done_file.write_text(json.dumps({"args": [strategy, nproc, *args], "wall_s": wall}))
    return wall


def common(data_dir: Path, steps: int) -> list[str]:
    return [
        "--data",
        str(data_dir),
        "--max-len",
        "50",
        "--train.global_batch_size=16",
        f"--train.max_steps={steps}",
        "--train.log_every=1",
        "--train.eval_every=0",
        "--checkpoint.every_steps=0",
        "--model.item_attributes=false",
        "--heads.type_weight=0",
        "--heads.time_weight=0",
        "--heads.value_weight=0",
        "--data.num_workers=0",
    ]


def throughput(strategies, steps: int) -> list[dict]:
    data_dir = data(2000, "speed")
    rows = []
    for strategy, nproc in strategies:
        out = WORK / "runs" / f"speed_{strategy}_{nproc}"
        args = [
            *common(data_dir, steps),
            "--num-layers",
            "4",
            "--model.pretrained_weights=true",
            "--train.micro_batch_size=8",
        ]
        wall = run(strategy, nproc, args, out)
        log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        rate = statistics.median(r["tokens_per_s"] for r in log[3:])
        rows.append(
            {"strategy": strategy, "processes": nproc, "tokens_per_s": round(rate, 1), "wall_s": round(wall, 1)}
        )
        print(rows[-1], flush=True)
    return rows


def memory(strategies, steps: int) -> list[dict]:
    data_dir = data(300, "memory")
    rows = []
    for strategy, nproc in strategies:
        out = WORK / "runs" / f"memory_{strategy}_{nproc}"
        args = [
            *common(data_dir, steps),
            "--model.pretrained_weights=true",  # full fine-tuning of all 30 pretrained blocks
            "--model.num_layers=none",
            "--full-finetune",
            "--train.micro_batch_size=4",
            "--train.global_batch_size=8",
        ]
        wall = run(strategy, nproc, args, out)
        res = json.loads((out / "resources.json").read_text())
        peaks = [r["peak_rss_gib"] for r in res["ranks"]]
        rows.append(
            {
                "strategy": strategy,
                "processes": nproc,
                "peak_rss_gib_per_rank": [round(p, 3) for p in peaks],
                "max_rank_rss_gib": round(max(peaks), 3),
                "wall_s": round(wall, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speed-steps", type=int, default=40)
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--fresh", action="store_true", help="rerun configurations that already finished")
    args = parser.parse_args()
    global FRESH
    FRESH = args.fresh
    strategies = [("single", 1), ("ddp", 2), ("zero1", 2), ("zero2", 2), ("zero3", 2)]
    speed = throughput(strategies, args.speed_steps)
    mem = memory(strategies, args.memory_steps)
    metrics: dict[str, float] = {}
    for r in speed:
        metrics[f"tokens_per_s_{r['strategy']}_{r['processes']}p"] = r["tokens_per_s"]
    for r in mem:
        metrics[f"peak_rss_gib_{r['strategy']}_{r['processes']}p"] = r["max_rank_rss_gib"]
    result = {
        "benchmark": "distributed",
        "dataset": "synthetic log (2,000 users for speed, 300 for memory; 2,000 items), windows of 50 events",
        "command": "python benchmarks/dist_bench.py",
        "machine": machine(),
        "metrics": metrics,
        "goal": "show the cost of 2 processes on 2 CPU cores and the per-rank memory saving of ZeRO-1/2/3 vs DDP "
        "for full fine-tuning of SmolLM2-135M",
        "throughput": speed,
        "memory": mem,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Distributed training on 2 CPU cores",
        "",
        f"`{result['command']}` on {result['machine']}.",
        "",
        "Throughput: SmolLM2 first 4 blocks + LoRA, global batch 16 x 50 events.",
        "",
        "| strategy | processes | targets/s | wall s |",
        "|---|---|---|---|",
        *[f"| {r['strategy']} | {r['processes']} | {r['tokens_per_s']:,.0f} | {r['wall_s']} |" for r in speed],
        "",
        "Peak memory per rank: SmolLM2-135M (30 blocks) fully fine-tuned, fp32, AdamW.",
        "",
        "| strategy | processes | peak RSS per rank (GiB) |",
        "|---|---|---|",
        *[
            f"| {r['strategy']} | {r['processes']} | {', '.join(f'{p:.2f}' for p in r['peak_rss_gib_per_rank'])} |"
            for r in mem
        ],
        "",
    ]
    (RESULTS / "distributed.md").write_text("\n".join(lines))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
