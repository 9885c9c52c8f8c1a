"""Training speed: tokens/s (next-event targets per second) and MFU for several model configs, and
the training step of this tree against an earlier commit's, side by side.

    python benchmarks/train_speed.py                 # CPU: SASRec-size scratch and SmolLM2 + LoRA
    python benchmarks/train_speed.py --device cuda   # on a GPU (bf16 autocast)
    python benchmarks/train_speed.py --against 9249530 --steps 4000 --seeds 0,1

``--against REV``: `bgpt train` of the Amazon Sports recipe (benchmarks/configs/sports_refit.yaml,
a step budget instead of its time budget, validation only at the end) from a git worktree of REV
and from this tree, alternating, one seed at a time. Both arms train on the same samples in the
same order, so the speed-up is the ratio of training seconds for the same steps; validation
NDCG@10 at the last step shows whether the new step learns the same. Writes
benchmarks/results/train_speed.json/.md (the config figures: train_speed_configs.json/.md).

FLOPs per step are counted, not estimated, with torch.utils.flop_counter.FlopCounterMode on one
real training step (forward + backward). MFU = counted FLOPs per second / peak FLOPs per second,
where the CPU peak is *measured* here (best of several large fp32 matmuls) and the GPU peak is
the datasheet dense bf16 figure given with --peak-tflops. Data: Amazon Sports shards if
../shared/data is present, else a synthetic log.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from shard_bench import REPO, SHARED, machine
from torch.utils.flop_counter import FlopCounterMode

from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig
from trainer.factory import build_model
from trainer.heads import HeadsConfig
from trainer.model import LoraConfig, ModelConfig

BGPT = [sys.executable, "-m", "launch.cli"]
CONFIGS = {
    "sasrec_2x64_full_softmax": (
        ModelConfig(backbone="scratch", num_layers=2, hidden_size=64, item_attributes=False),
        HeadsConfig(type_weight=0, time_weight=0, value_weight=0),
        128,
    ),
    "smollm2_4_layers_lora": (
        ModelConfig(num_layers=4, pretrained_weights=True, item_attributes=False),
        HeadsConfig(type_weight=0, time_weight=0, value_weight=0),
        32,
    ),
    "smollm2_30_layers_lora": (
        ModelConfig(num_layers=None, pretrained_weights=True, item_attributes=False),
        HeadsConfig(type_weight=0, time_weight=0, value_weight=0),
        16,
    ),
}


def dataset() -> tuple[Path, str]:
    sports = SHARED / "amazon-sports" / "interactions.csv"
    out = REPO / "bench_data" / "shards_sports"
    if sports.exists():
        if not (out / "manifest.json").exists():
            subprocess.run([*BGPT, "shard", "--input", str(sports), "--out", str(out)], check=True, cwd=REPO)
        return out, "Amazon Sports 5-core (max_len 50)"
    out = REPO / "bench_data" / "shards_speed_synth"
    if not (out / "manifest.json").exists():
        raw = REPO / "bench_data" / "speed_synth" / "events.csv"
        subprocess.run(
            [*BGPT, "synth", "--events", "300000", "--users", "30000", "--items", "18000", "--out", str(raw)],
            check=True,
            cwd=REPO,
        )
        subprocess.run([*BGPT, "shard", "--input", str(raw), "--out", str(out)], check=True, cwd=REPO)
    return out, "synthetic 300k events, 18k items (max_len 50)"


def cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure(name: str, data: Path, device: torch.device, steps: int) -> dict:
    model_cfg, heads_cfg, batch_size = CONFIGS[name]
    model, _ = build_model(model_cfg, LoraConfig(), heads_cfg, data)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    loader = iter(StreamLoader(ShardDataset(data, StreamConfig(max_len=50, batch_size=batch_size)), num_workers=1))
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def step(batch) -> int:
        with autocast:
            out = model(batch)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(out["targets"])

    batches = [{k: v.to(device) for k, v in next(loader).items()} for _ in range(steps + 2)]
    with FlopCounterMode(display=False) as counter:
        counted_targets = step(batches[0])
    flops_per_target = counter.get_total_flops() / counted_targets
    step(batches[1])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, targets = time.perf_counter(), 0
    for batch in batches[2:]:
        targets += step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in params)
    return {
        "tokens_per_s": round(targets / seconds, 1),
        "flops_per_token": round(flops_per_target),
        "achieved_tflops": round(flops_per_target * targets / seconds / 1e12, 4),
        "trainable_params": trainable,
        "micro_batch_size": batch_size,
        "steps_timed": steps,
    }


RECIPE = REPO / "benchmarks" / "configs" / "sports_refit.yaml"


def sports_with_items() -> Path:
    out = REPO / "bench_data" / "shards_sports_items"
    if not (out / "manifest.json").exists():
        raw = SHARED / "amazon-sports"
        if not raw.exists():
            sys.exit(f"--against needs Amazon Sports at {raw} (see ../shared/data/README.md)")
        args = ["--input", str(raw / "interactions.csv"), "--items", str(raw / "items.csv"), "--out", str(out)]
        subprocess.run([*BGPT, "shard", *args], check=True, cwd=REPO)
    return out


def worktree(rev: str) -> Path:
    """A checkout of ``rev`` beside the repository's bench data (its `bgpt` runs from there)."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, check=True, cwd=REPO)
    path = REPO / "bench_data" / f"worktree_{sha.stdout.strip()}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], check=True, cwd=REPO)
    return path


def train_arm(code: Path, data: Path, run: Path, steps: int, seed: int, recipe: Path = RECIPE, extra=()) -> dict:
    """One `bgpt train` of the recipe (plus ``extra`` flags) for ``steps`` steps from the tree at ``code``."""
    overrides = [f"--train.max_steps={steps}", "--train.max_minutes=none", "--train.eval_every=0"]
    overrides += [f"--train.seed={seed}", "--checkpoint.every_steps=0", *extra]
    cmd = [*BGPT, "train", "--data", str(data), "--config", str(recipe), "--out", str(run), *overrides]
    subprocess.run(cmd, check=True, cwd=code, stdout=subprocess.DEVNULL)
    train = json.loads((run / "metrics.json").read_text())["train"]
    valid = [json.loads(line) for line in (run / "valid_metrics.jsonl").read_text().splitlines()][-1]
    assert train["step"] == steps == valid["step"], (train, valid)
    return {
        "seconds": train["seconds"],
        "targets": train["tokens"],
        "tokens_per_s": train["tokens"] / train["seconds"],
        "ndcg@10": valid["valid"]["ndcg@10"],
        "hr@10": valid["valid"]["hr@10"],
    }


def count_baselines(data: Path) -> dict[str, float]:
    """Popularity and item-to-item transition on the same validation events, by the same metric code
    (`bgpt baseline`, history excluded as the runs' eval.exclude_seen=auto decides)."""
    out = REPO / "bench_data" / "train_speed" / "baselines.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = ["baseline", "popularity", "transition", "--data", str(data), "--protocol", "split", "--split", "valid"]
    subprocess.run([*BGPT, *args, "--exclude-seen", "auto", "--out", str(out)], check=True, cwd=REPO)
    scorers = json.loads(out.read_text())["scorers"]
    return {f"{name}_{k}": round(scorers[name]["overall"][k], 4) for name in scorers for k in ("ndcg@10", "hr@10")}


def compare(rev: str, steps: int, seeds: list[int]) -> None:
    data, old_code = sports_with_items(), worktree(rev)
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for seed in seeds:
        for arm, code in (("old", old_code), ("new", REPO)):
            result = train_arm(code, data, REPO / "bench_data" / "train_speed" / f"{arm}_seed{seed}", steps, seed)
            runs[arm].append({"seed": seed, **result})
            print(arm, runs[arm][-1], flush=True)
    mean = {arm: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0] if k != "seed"} for arm, rs in runs.items()}
    if {r["targets"] for r in runs["old"]} != {r["targets"] for r in runs["new"]}:
        sys.exit(f"the arms trained on different targets: {runs}")
    metrics = {
        "speedup": round(mean["old"]["seconds"] / mean["new"]["seconds"], 3),
        "tokens_per_s": round(mean["new"]["tokens_per_s"], 1),
        "baseline_tokens_per_s": round(mean["old"]["tokens_per_s"], 1),
        "ndcg@10": round(mean["new"]["ndcg@10"], 4),
        "baseline_ndcg@10": round(mean["old"]["ndcg@10"], 4),
        "hr@10": round(mean["new"]["hr@10"], 4),
        "baseline_hr@10": round(mean["old"]["hr@10"], 4),
        "steps": steps,
        **count_baselines(data),
    }
    command = f"python benchmarks/train_speed.py --against {rev} --steps {steps} --seeds {','.join(map(str, seeds))}"
    result = {
        "benchmark": "train_speed",
        "dataset": "Amazon Sports 5-core with item attributes, leave-one-out validation (all items ranked)",
        "command": command,
        "machine": machine(),
        "metrics": metrics,
        "goal": "issue 19: Sports training >= 2x the targets/s of today's step at the same validation NDCG@10",
        "runs": runs,
        "notes": f"old = commit {rev} (`bgpt train` from a git worktree), new = this tree; recipe "
        f"benchmarks/configs/sports_refit.yaml for {steps} steps, validation at the last step only, "
        "checkpoints off; seconds = training seconds to the last step (validation excluded); "
        "both arms train on the same samples (equal targets checked)",
    }
    out = REPO / "benchmarks" / "results"
    (out / "train_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {arm} | {r['seed']} | {r['seconds']:,.0f} | {r['tokens_per_s']:,.0f} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} |"
        for arm, rs in runs.items()
        for r in rs
    )
    (out / "train_speed.md").write_text(
        f"# train_speed: {result['dataset']}\n\n`{command}` on {result['machine']}\n\n"
        f"Speed-up (training seconds, old / new, same steps and samples): **{metrics['speedup']}x**; "
        f"valid NDCG@10 {metrics['baseline_ndcg@10']} (old) vs {metrics['ndcg@10']} (new, mean of seeds); "
        f"count baselines on the same events: popularity {metrics['popularity_ndcg@10']}, "
        f"transition {metrics['transition_ndcg@10']}.\n\n"
        f"| arm | seed | train seconds | targets/s | valid NDCG@10 | valid HR@10 |\n|---|---|---|---|---|---|\n{rows}\n\n"
        f"{result['notes']}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--peak-tflops", type=float, help="device peak (GPU: datasheet dense bf16)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--against", metavar="REV", help="compare this tree's training step with REV's (see above)")
    parser.add_argument("--seeds", default="0", help="--against: comma-separated seeds")
    args = parser.parse_args()
    if args.against:
        compare(args.against, args.steps, [int(s) for s in args.seeds.split(",")])
        return
    device = torch.device(args.device)
    data, desc = dataset()
    peak = args.peak_tflops * 1e12 if args.peak_tflops else cpu_peak_flops()
    metrics: dict[str, float] = {"peak_tflops": round(peak / 1e12, 4)}
    details = {}
    for name in args.configs.split(","):
        steps = args.steps if "30_layers" not in name else max(3, args.steps // 5)
        result = measure(name, data, device, steps)
        details[name] = result
        metrics[f"{name}_tokens_per_s"] = result["tokens_per_s"]
        metrics[f"{name}_mfu"] = round(result["achieved_tflops"] * 1e12 / peak, 4)
        print(name, result, flush=True)
    peak_note = "measured best fp32 2048^3 matmul" if not args.peak_tflops else "datasheet dense bf16"
    result = {
        "benchmark": "train_speed_configs",
        "dataset": desc,
        "command": "python benchmarks/train_speed.py " + " ".join(sys.argv[1:]),
        "machine": machine() if device.type == "cpu" else torch.cuda.get_device_name(),
        "metrics": metrics,
        "goal": "report tokens/s for the SASRec-size config and SmolLM2 + LoRA, with an MFU estimate",
        "details": details,
        "notes": f"tokens = next-event targets; FLOPs counted by FlopCounterMode on one step; peak = {peak_note}",
    }
    name = "train_speed_configs" if device.type == "cpu" else "train_speed_configs_gpu"
    out = REPO / "benchmarks" / "results"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {k} | {v['micro_batch_size']} | {v['trainable_params']:,} | {v['tokens_per_s']:,} | "
        f"{v['flops_per_token'] / 1e6:,.1f} | {metrics[k + '_mfu']:.2%} |"
        for k, v in details.items()
    )
    (out / f"{name}.md").write_text(
        f"# {name}: {desc}\n\n`{result['command']}` on {result['machine']}; peak {metrics['peak_tflops']} TFLOP/s "
        f"({peak_note})\n\n| config | micro batch | trainable params | tokens/s | MFLOP/token | MFU |\n|---|---|---|---|---|---|\n{rows}\n"
    )


if __name__ == "__main__":
    main()
