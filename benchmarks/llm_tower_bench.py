"""Issue 18: does a pretrained LLM reading item text earn its place? MovieLens-1M (users 1-2999),
leave-one-out, full ranking, every arm the model of benchmarks/configs/llm_tower.yaml at the same
step budget, differing only in the item-text vectors:

    id_only    no text (--model.item_text=none)
    minilm     all-MiniLM-L6-v2 sentence vectors of the title (today's default)
    llm_last   the frozen LLM tower (SmolLM2-135M, 30 blocks) on title + genres, last-token pooling
    llm_mean   the same, mean pooling
    pretrained_lora / pretrained_full   the best text arm's vectors (chosen on validation) with the
               user model started from SmolLM2's pretrained weights: LoRA, or every weight trained

The winner is chosen on validation NDCG@10; every arm's test figures are those of its own
best-on-validation weights (benchmarks/accuracy_bench.py, one results file per arm).

Cold-start split: 10% of the items (seed 0) lose every event except those that are their user's
strictly latest event (the leave-one-out test target), so they are never trained on and only
ever asked for; the id-only arm, the best text arm, and the best text arm with id dropout 0.3
(the recipe for items first seen after training: the text path alone must carry an item, and
the goal's cold/warm pair) train on that data. Before the test, each
cold item's id row is replaced by the id part an item posted after training gets
(trainer.new_items: the UNK row with id dropout, else zero with text, the mean id row without),
so it is ranked by what a new
item has: its text. Test HR@10 / NDCG@10 are reported separately for users whose target is a
cold item and for the others.

    python benchmarks/llm_tower_bench.py            # trains what has no result yet, then reports
    python benchmarks/llm_tower_bench.py --report-only

Writes benchmarks/results/llm_item_tower.json and .md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from accuracy_bench import BGPT, DATASETS
from shard_bench import REPO, SHARED, machine

CONFIG = "benchmarks/configs/llm_tower.yaml"
ARMS = {
    "id_only": ("none", ["--model.item_text=none"]),
    "minilm": ("minilm", ["--model.item_text=minilm"]),
    "llm_last": ("llm_last", ["--model.item_text=llm", "--model.text_pooling=last"]),
    "llm_mean": ("llm_mean", ["--model.item_text=llm", "--model.text_pooling=mean"]),
}
PRETRAINED = {
    "pretrained_lora": ["--model.pretrained_weights=true"],
    "pretrained_full": ["--model.pretrained_weights=true", "--lora.full_finetune=true"],
}
"""The user model (SmolLM2's first 2 blocks) from its pretrained weights, with LoRA adapters or
trained in full, reading the best text arm's vectors (every arm above starts from random weights)."""
RESULTS = REPO / "benchmarks" / "results"
COLD_SHARE, COLD_SEED = 0.1, 0
ID_DROPOUT = 0.3
"""For the cold split's third arm (chosen before it ran, not searched)."""


def arm_result(arm: str, report_only: bool) -> dict:
    name, flags = ARMS[arm]
    path = RESULTS / f"llm_tower_{name}.json"
    if not path.exists() and not report_only:
        cmd = [
            sys.executable,
            "benchmarks/accuracy_bench.py",
            "ml1m",
            "--config",
            CONFIG,
            "--name",
            f"llm_tower_{name}",
        ]
        subprocess.run([*cmd, *flags], check=True, cwd=REPO)
    return json.loads(path.read_text())


def cold_split(out: Path) -> tuple[Path, set[str]]:
    """The ML-1M ratings with 10% of items kept only as strictly-latest events; (file, cold ids)."""
    source = SHARED / "ml-1m" / "ratings_users_0001-2999.dat"
    rows = [line.split("::") for line in source.read_text().splitlines() if line]
    items = sorted({r[1] for r in rows}, key=int)
    rng = np.random.default_rng(COLD_SEED)
    cold = set(rng.choice(items, size=round(COLD_SHARE * len(items)), replace=False).tolist())
    latest: dict[str, tuple[int, int]] = {}  # user -> (latest timestamp, events at it)
    for user, _, _, ts in rows:
        top, count = latest.get(user, (-1, 0))
        t = int(ts)
        latest[user] = (t, 1) if t > top else (top, count + (t == top))
    keep = [r for r in rows if r[1] not in cold or latest[r[0]] == (int(r[3]), 1)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join("::".join(r) + "\n" for r in keep))
    return out, cold


def cold_breakdown(run: Path, cold: set[str]) -> dict:
    """Test metrics of ``run`` for users whose target is a cold item and for the others (the
    project's ranking and metric code: trainer.evaluate)."""
    import torch

    sys.path.insert(0, str(REPO))
    from trainer.evaluate import eval_loader, evaluate_batches, held_out, rank_metrics, resolve_exclude_seen
    from trainer.new_items import ItemWriter
    from trainer.run import load_run_model

    model, cfg, info = load_run_model(run, log=lambda *a: None)
    names = np.array(info.items, dtype=object)
    # The cold items sat in the table as never-positive rows; give them the id part a new item
    # posted after training gets (trainer.new_items), so they are ranked as truly new items are.
    cold_ids = torch.tensor([i for i, name in enumerate(names) if name in cold])
    with torch.no_grad():
        model.items.ids.weight[cold_ids] = ItemWriter.from_model(model).id_row
    cfg.eval.exclude_seen = resolve_exclude_seen(cfg.eval.exclude_seen, cfg.data.root, log=lambda *a: None)
    loader = lambda: eval_loader(cfg.data.root, "test", cfg.model.max_len, cfg.eval.batch_size)  # noqa: E731
    ranks = evaluate_batches(model, loader(), cfg.eval, torch.device("cpu"), ranks=True)["ranks"]
    targets = np.concatenate([held_out(b)[2].numpy() for b in loader()])
    is_cold = np.array([names[t] in cold for t in targets])
    out = {"cold_targets": int(is_cold.sum()), "warm_targets": int((~is_cold).sum())}
    for label, subset in (("cold", is_cold), ("warm", ~is_cold)):
        metrics = rank_metrics(ranks[subset], [10])
        out[f"{label}_hr@10"], out[f"{label}_ndcg@10"] = metrics["hr@10"], metrics["ndcg@10"]
    return out


def cold_runs(arms: list[str], report_only: bool) -> dict[str, dict]:
    data_file, cold = cold_split(REPO / "bench_data" / "ml1m_cold" / "ratings.dat")
    data = REPO / "bench_data" / "shards_ml1m_cold"
    if not (data / "manifest.json").exists() and not report_only:
        shard_args = list(DATASETS["ml1m"][1])
        shard_args[shard_args.index("--input") + 1] = str(data_file)
        subprocess.run([*BGPT, "shard", *shard_args, "--out", str(data)], check=True, cwd=REPO)
    results = {}
    for arm in arms:
        run = REPO / "bench_data" / f"run_llm_cold_{arm}"
        if not (run / "metrics.json").exists() and not report_only:
            cmd = [*BGPT, "train", "--data", str(data), "--out", str(run), "--config", CONFIG, *ARMS[arm][1]]
            subprocess.run([*cmd, "--checkpoint.resume=none"], check=True, cwd=REPO)
        results[arm] = cold_breakdown(run, cold)
    return results


def table(arms: dict[str, dict], cold: dict[str, dict], chosen: str) -> str:
    first = next(iter(arms.values()))
    lines = [
        "# llm_item_tower: item-text vectors for the default model, MovieLens-1M users 1-2999",
        "",
        f"`{first['command'].split(' --name')[0]} ...` per arm; summary: `python benchmarks/llm_tower_bench.py`.",
        "Leave-one-out, all items ranked, history excluded; each arm's test figures are those of its",
        "best-on-validation weights; the winner is chosen on validation.",
        "",
        "| arm | valid NDCG@10 | test NDCG@10 | test HR@10 | best step | training minutes |",
        "|---|---|---|---|---|---|",
        f"| popularity | | {first['metrics']['popularity_exclude_seen_ndcg@10']:.4f} | | | |",
        f"| transition (item-to-item count) | | {first['metrics']['transition_exclude_seen_ndcg@10']:.4f} | "
        f"{first['metrics']['transition_exclude_seen_hr@10']:.4f} | | |",
    ]
    for arm, result in arms.items():
        m = result["metrics"]
        mark = " (chosen)" if arm == chosen else ""
        lines.append(
            f"| {arm}{mark} | {m['valid_ndcg@10']:.4f} | {m['exclude_seen_ndcg@10']:.4f} | "
            f"{m['exclude_seen_hr@10']:.4f} | {m['best_step']} | {m['training_minutes']} |"
        )
    lines += ["", "Cold-start split (10% of items never trained on, asked for as test targets):", ""]
    lines += ["| arm | cold HR@10 | cold NDCG@10 | warm HR@10 | warm NDCG@10 | cold / warm HR@10 |"]
    lines += ["|---|---|---|---|---|---|"]
    for arm, c in cold.items():
        ratio = c["cold_hr@10"] / c["warm_hr@10"] if c["warm_hr@10"] else 0.0
        lines.append(
            f"| {arm} | {c['cold_hr@10']:.4f} | {c['cold_ndcg@10']:.4f} | {c['warm_hr@10']:.4f} | "
            f"{c['warm_ndcg@10']:.4f} | {ratio:.2f} |"
        )
    targets = next(iter(cold.values()))
    lines.append(f"\n{targets['cold_targets']:,} cold and {targets['warm_targets']:,} warm test targets.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms")
    parser.add_argument("--report-only", action="store_true", help="report the runs that exist")
    args = parser.parse_args()
    arms = {arm: arm_result(arm, args.report_only) for arm in args.arms.split(",")}
    text_arms = [a for a in arms if a != "id_only"]
    best_text = max(text_arms, key=lambda a: arms[a]["metrics"]["valid_ndcg@10"])
    for arm, flags in PRETRAINED.items():
        ARMS[arm] = (arm, [*ARMS[best_text][1], *flags])
        arms[arm] = arm_result(arm, args.report_only)
    chosen = max(arms, key=lambda a: arms[a]["metrics"]["valid_ndcg@10"])
    # The product's answer to items first seen after training: id dropout, so that the text path
    # alone must carry an item (trainer.model.ItemEncoder); the cold items then read the UNK row.
    ARMS[f"{best_text}_id_dropout"] = (
        f"{best_text}_id_dropout",
        [*ARMS[best_text][1], f"--model.id_dropout={ID_DROPOUT}"],
    )
    cold_arms = ["id_only", best_text, f"{best_text}_id_dropout"]
    cold = cold_runs([a for a in cold_arms if a in ARMS and (a != "id_only" or "id_only" in arms)], args.report_only)
    metrics = {}
    for arm, result in arms.items():
        m = result["metrics"]
        metrics.update(
            {
                f"{arm}_ndcg@10": m["exclude_seen_ndcg@10"],
                f"{arm}_hr@10": m["exclude_seen_hr@10"],
                f"{arm}_valid_ndcg@10": m["valid_ndcg@10"],
                f"{arm}_best_step": m["best_step"],
                f"{arm}_training_minutes": m["training_minutes"],
            }
        )
    first = next(iter(arms.values()))["metrics"]
    metrics["popularity_ndcg@10"] = first["popularity_exclude_seen_ndcg@10"]
    metrics["transition_ndcg@10"] = first["transition_exclude_seen_ndcg@10"]
    # The goal's pair: the recipe meant for new items (text arm + id dropout), fixed, not chosen on test.
    best_cold = f"{best_text}_id_dropout" if f"{best_text}_id_dropout" in cold else best_text
    metrics["cold_hr@10"], metrics["warm_hr@10"] = cold[best_cold]["cold_hr@10"], cold[best_cold]["warm_hr@10"]
    for arm, c in cold.items():
        metrics.update({f"cold_split_{arm}_{k}": v for k, v in c.items()})
    llm = [a for a in arms if a.startswith("llm")]
    if llm and "minilm" in arms:
        best_llm = max(llm, key=lambda a: arms[a]["metrics"]["valid_ndcg@10"])
        metrics["best_llm_vs_minilm_ndcg@10"] = round(metrics[f"{best_llm}_ndcg@10"] / metrics["minilm_ndcg@10"], 4)
    result = {
        "benchmark": "llm_item_tower",
        "dataset": "MovieLens-1M users 1-2999, leave-one-out, all items ranked, history excluded",
        "command": "python benchmarks/llm_tower_bench.py",
        "machine": machine(),
        "chosen_on_validation": chosen,
        "cold_arm": best_cold,
        "metrics": metrics,
        "goal": "best LLM arm test NDCG@10 >= 1.1x the MiniLM default at the same budget; "
        "cold HR@10 >= 0.5x warm HR@10 for the best text arm",
    }
    (RESULTS / "llm_item_tower.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "llm_item_tower.md").write_text(table(arms, cold, chosen))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
