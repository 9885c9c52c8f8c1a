"""Batch prediction and export benchmark: users/s of `bgpt predict`, and what dynamic int8
quantization of an export changes (test accuracy, batch and single-request speed, size).

    python benchmarks/predict_bench.py     # needs the runs serve_bench.py uses (it creates the SmolLM2 one)

For each model (small = SASRec-size 2x64, smollm2 = SmolLM2-135M first 4 blocks, LoRA merged)
it exports fp32 and int8 (`bgpt export --merge-lora [--quantize int8]`), then with each export:
predicts top-10 for all 2,999 MovieLens-1M users (users/s), scores the test split (full
ranking), and times one recommend of a 50-event history (median of 200, 1 thread).
Writes benchmarks/results/predict.json and predict.md.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_bench import BGPT, DATA, RUNS, ensure_runs  # noqa: E402
from shard_bench import REPO, machine, write_results  # noqa: E402


def directory_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def measure(export: Path) -> dict:
    import torch

    from trainer.evaluate import EvalConfig, evaluate_inference
    from trainer.export import load_export
    from trainer.predict import histories_from_data, write_predictions

    torch.set_num_threads(2)
    model = load_export(export)
    out = export / "preds.parquet"
    stats = write_predictions(model, histories_from_data(DATA, model), out, k=10, progress=False)
    out.unlink()
    metrics = evaluate_inference(model, DATA, "test", EvalConfig(ks=[10]))
    torch.set_num_threads(1)
    window = next(h for h in histories_from_data(DATA, model) if len(h.items) >= 50)
    items, types, times = (list(map(int, v[-50:])) for v in (window.items, window.types, window.times))
    timings = []
    for _ in range(200):
        t0 = time.perf_counter()
        model.top_k(model.hidden_at(model.start(items, types, times), times[-1])[None], 10)
        timings.append(time.perf_counter() - t0)
    return {
        "users_per_s": stats["users_per_s"],
        "hr@10": metrics["hr@10"],
        "ndcg@10": metrics["ndcg@10"],
        "single_p50_ms": round(float(np.median(timings)) * 1000, 3),
    }


def main() -> None:
    import subprocess

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_runs()
    results: dict = {}
    for name, run in RUNS.items():
        for quant in ("fp32", "int8"):
            export = REPO / "bench_data" / "exports" / f"{name}_{quant}"
            cmd = [*BGPT, "export", "--run", str(run), "--out", str(export), "--merge-lora", "--overwrite"]
            subprocess.run(cmd + (["--quantize", "int8"] if quant == "int8" else []), check=True, cwd=REPO)
            results[f"{name}_{quant}"] = {**measure(export), "export_mib": directory_mib(export)}
            print(name, quant, results[f"{name}_{quant}"], flush=True)
    metrics: dict[str, float] = {}
    for key, r in results.items():
        for field, value in r.items():
            metrics[f"{key}_{field}"] = value
    for name in RUNS:
        fp, q = results[f"{name}_fp32"], results[f"{name}_int8"]
        metrics[f"{name}_int8_ndcg@10_change"] = round(q["ndcg@10"] - fp["ndcg@10"], 6)
        metrics[f"{name}_int8_batch_speedup"] = round(q["users_per_s"] / fp["users_per_s"], 2)
        metrics[f"{name}_int8_single_speedup"] = round(fp["single_p50_ms"] / q["single_p50_ms"], 2)
    out = {
        "benchmark": "predict",
        "dataset": "MovieLens-1M users 1-2999 (all users predicted; test split for accuracy)",
        "command": "python benchmarks/predict_bench.py",
        "machine": machine(),
        "metrics": metrics,
        "goal": "report users/s of batch prediction, and the accuracy change and speed-up of int8 dynamic "
        "quantization on CPU (no threshold set by the issue)",
    }
    lines = [
        "# predict: batch prediction and int8 exports (2 CPU cores)",
        "",
        f"`{out['command']}` on {out['machine']}",
        "",
        "| model | weights | users/s (batch 256, 2 threads) | one 50-event recommend ms (1 thread) | "
        "test HR@10 | test NDCG@10 | export MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        name, quant = key.rsplit("_", 1)
        lines.append(
            f"| {name} | {quant} | {r['users_per_s']} | {r['single_p50_ms']} | {r['hr@10']} | {r['ndcg@10']} | "
            f"{r['export_mib']} |"
        )
    write_results("predict", out, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
