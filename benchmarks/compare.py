"""Side-by-side tables from accuracy runs already measured by accuracy_bench.py.

    python benchmarks/compare.py ml1m --runs ml1m_sasrec,ml1m_genres
    python benchmarks/compare.py llm_vs_scratch --runs llm_pretrained_lora_text,llm_pretrained_lora_notext,...

Reads benchmarks/results/<run>.json for each run (test split of the weights chosen on
validation, plus the popularity baseline measured in the same runs) and writes
benchmarks/results/<name>.json and <name>.md. No number is computed here that a run did not
measure; the metrics keys are prefixed with the run name.
"""

from __future__ import annotations

import argparse
import json
import sys

from shard_bench import REPO, machine

RESULTS = REPO / "benchmarks" / "results"
KEYS = ("hr@10", "ndcg@10", "mrr", "coverage@10", "valid_ndcg@10", "training_minutes", "tokens_per_s")
GOALS = {
    "ml1m": "MovieLens-1M users 1-2999, leave-one-out, full ranking: popularity, the from-scratch SASRec-size "
    "model and the best configuration side by side",
    "llm_vs_scratch": "does the pretrained SmolLM2 backbone (LoRA, first blocks) beat the same architecture "
    "trained from random weights, with and without item text, on the same data and training steps?",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=sorted(GOALS))
    parser.add_argument("--runs", required=True, help="result names, comma separated")
    args = parser.parse_args()
    runs = {name: json.loads((RESULTS / f"{name}.json").read_text()) for name in args.runs.split(",")}
    first = next(iter(runs.values()))
    metrics: dict[str, float] = {
        "popularity_hr@10": first["metrics"]["popularity_hr@10"],
        "popularity_ndcg@10": first["metrics"]["popularity_ndcg@10"],
    }
    for name, result in runs.items():
        for key in KEYS:
            metrics[f"{name}_{key}"] = result["metrics"][key]
    best = max(runs, key=lambda n: runs[n]["metrics"]["valid_ndcg@10"])
    result = {
        "benchmark": args.name,
        "dataset": first["dataset"],
        "command": "python benchmarks/compare.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "metrics": metrics,
        "goal": GOALS[args.name],
        "best_on_validation": best,
        "runs": {name: r["command"] for name, r in runs.items()},
    }
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# {args.name}: {first['dataset']}",
        "",
        f"{GOALS[args.name]}",
        "",
        "Test split of the weights chosen on validation; each row is a committed run "
        "(its own JSON has the command and config).",
        "",
        "| model | test HR@10 | test NDCG@10 | MRR | coverage@10 | valid NDCG@10 | minutes | targets/s |",
        "|---|---|---|---|---|---|---|---|",
        f"| popularity | {metrics['popularity_hr@10']:.4f} | {metrics['popularity_ndcg@10']:.4f} | | | | | |",
    ]
    for name, r in runs.items():
        m = r["metrics"]
        lines.append(
            f"| {name} | {m['hr@10']:.4f} | {m['ndcg@10']:.4f} | {m['mrr']:.4f} | {m['coverage@10']:.3f} | "
            f"{m['valid_ndcg@10']:.4f} | {m['training_minutes']} | {m['tokens_per_s']:,} |"
        )
    lines += ["", f"Best on validation: **{best}**.", ""]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
