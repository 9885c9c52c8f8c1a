"""What the HLLM-style tuned item-text tower (model.text_tuning=lora) costs a training step, against
the frozen tower, on MovieLens-1M with titles (the model of benchmarks/configs/llm_tower.yaml).

    python benchmarks/text_tuning_speed.py [--steps 3] [--caps 0,256,64] [--layers 30]

Each arm builds the model of the issue-18 comparison (SmolLM2's architecture, 2 blocks, random
init; item text through SmolLM2-135M's first ``--layers`` blocks, last-token pooling) and times
``--steps`` training steps (forward, backward, AdamW) on the same real batches after one warm-up
step. The tuned arms re-encode the batch's distinct items with gradients, at most ``cap`` of them
(0: all); the full catalogue refresh that precedes every evaluation is timed once. The figures
say how many steps of the issue's 15-minute budget each arm gets on this machine. Writes
benchmarks/results/text_tuning_speed.json and .md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch
from accuracy_bench import dataset_shards
from shard_bench import REPO, SHARED, TreeRss, machine, write_results

from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig
from trainer.config import build_config
from trainer.factory import build_model

CONFIG = REPO / "benchmarks" / "configs" / "llm_tower.yaml"
BUDGET_S = 15 * 60


def ml1m_with_titles() -> Path:
    """The shards accuracy_bench.py trains MovieLens-1M on (built the same way when missing)."""
    if not (REPO / "bench_data" / "shards_ml1m" / "manifest.json").exists() and not (SHARED / "ml-1m").exists():
        sys.exit(f"needs MovieLens-1M at {SHARED / 'ml-1m'} (see ../shared/data/README.md)")
    return dataset_shards("ml1m")


def arm_model(data: Path, layers: int, cap: int | None):
    """The comparison's model; ``cap`` None: frozen tower, else tuned with at most ``cap`` items."""
    import yaml

    raw = yaml.safe_load(CONFIG.read_text())
    raw["data"] = {**raw.get("data", {}), "path": str(data)}
    raw["model"].update(item_text="llm", text_pooling="last", text_tower_layers=layers)
    if cap is not None:
        raw["model"].update(text_tuning="lora", text_tuned_items=cap)
    cfg = build_config(raw)
    model, _ = build_model(cfg.model, cfg.lora, cfg.heads, data, cache=REPO / "bench_data" / "text_tuning_cache")
    return model.train(), cfg


def measure(data: Path, layers: int, cap: int | None, steps: int) -> dict:
    rss = TreeRss(os.getpid())
    rss.start()
    model, cfg = arm_model(data, layers, cap)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
    stream = StreamConfig(max_len=cfg.model.max_len, batch_size=cfg.train.micro_batch_size, seed=0)
    loader = iter(StreamLoader(ShardDataset(data, stream), num_workers=1))
    batches = [next(loader) for _ in range(steps + 1)]

    def step(batch) -> int:
        out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(out["targets"])

    step(batches[0])  # warm-up
    start, targets = time.perf_counter(), 0
    for batch in batches[1:]:
        targets += step(batch)
    seconds = (time.perf_counter() - start) / steps
    rss.stop.set()
    distinct = sum(len(torch.unique(b["items"][b["mask"]])) for b in batches[1:]) / steps
    out = {"s_per_step": round(seconds, 3), "tokens_per_s": round(targets / steps / seconds, 1)}
    out["distinct_items_per_step"] = round(distinct, 1)
    out["steps_in_15_min"] = int(BUDGET_S // seconds)
    out["peak_rss_gib"] = round(rss.peak / 2**30, 2)
    if cap is not None:
        tower = model.items.tower
        started = time.perf_counter()
        tower.refresh(model.items.text)
        out["refresh_s"] = round(time.perf_counter() - started, 1)
        out["items_with_text"] = int(tower.has_text.sum())
        out["trainable_tower_params"] = sum(p.numel() for p in tower.parameters() if p.requires_grad)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--caps", default="64,256,0", help="tuned arms: items re-encoded per step (0: all)")
    parser.add_argument("--layers", type=int, default=30, help="tower blocks (SmolLM2-135M has 30)")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = ml1m_with_titles()
    arms = {"frozen": measure(data, args.layers, None, args.steps)}
    print("frozen", arms["frozen"], flush=True)
    for cap in [int(c) for c in args.caps.split(",")]:
        gc.collect()  # the previous arm's model goes before this one's peak is measured
        name = f"lora_cap_{cap}" if cap else "lora_all"
        arms[name] = measure(data, args.layers, cap, args.steps)
        print(name, arms[name], flush=True)
    metrics = {f"{arm}_{k}": v for arm, result in arms.items() for k, v in result.items()}
    command = f"python benchmarks/text_tuning_speed.py --steps {args.steps} --caps {args.caps} --layers {args.layers}"
    result = {
        "benchmark": "text_tuning_speed",
        "dataset": "MovieLens-1M users 1-2999 with titles and genres (3,615 items), batches of 32 x 50",
        "command": command,
        "machine": machine(),
        "metrics": metrics,
        "goal": "issue 18: what a tuned (HLLM-style) tower costs per step against the frozen tower",
    }
    lines = [
        f"# text_tuning_speed: the tuned item-text tower, SmolLM2-135M first {args.layers} blocks",
        "",
        f"`{command}` on {machine()}",
        "",
        "| arm | s / step | targets / s | distinct items / step | steps in 15 min | peak RSS GiB | catalogue refresh s |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, r in arms.items():
        lines.append(
            f"| {arm} | {r['s_per_step']} | {r['tokens_per_s']} | {r['distinct_items_per_step']} | "
            f"{r['steps_in_15_min']:,} | {r['peak_rss_gib']} | {r.get('refresh_s', '')} |"
        )
    write_results("text_tuning_speed", result, lines)


if __name__ == "__main__":
    main()
