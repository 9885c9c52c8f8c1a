"""Training speed of the trend prior under a full softmax: this tree against an earlier commit's.

    python benchmarks/trend_speed.py --against 6aae7ad --steps 100

MovieLens-1M users 1-2999, the continual bench's generations 1-5 (benchmarks/last_period.py's cut:
the data its generation-5 choices train on), recipe benchmarks/configs/continual_ml1m.yaml (full
softmax over the catalogue) with ``--model.trend_prior=true --model.id_dropout=0.2``, the flags
chosen on Sports. Each arm is one `bgpt train` for ``--steps`` steps (validation at the last step
only, next-period on generation 5 with online counts, checkpoints off), the old one from a git
worktree of REV, alternating, the same seed: both train on the same samples, so the speed-up is
the ratio of training seconds for the same steps, and equal losses at every step show that the
new code computes the same thing. Writes benchmarks/results/trend_speed.json/.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import train_speed
from continual_bench import _sources, source_parser
from last_period import append, period_files
from shard_bench import REPO, machine, write_results
from train_speed import worktree

RECIPE = REPO / "benchmarks" / "configs" / "continual_ml1m.yaml"
FLAGS = ["--model.trend_prior=true", "--model.id_dropout=0.2", "--data.validate_on_newest=true"]


def generation_5() -> Path:
    """The last-period bench's ML-1M data up to generation 5 (built once, then reused)."""
    work = REPO / "bench_data" / "trend_speed"
    args = source_parser(__doc__).parse_args(["ml1m"])
    files, items = period_files(args, work), _sources(args)[1]
    for k in range(5):
        append(work / "d5", files, k, items)
    return work / "d5"


def train_arm(code: Path, data: Path, run: Path, steps: int) -> dict:
    """train_speed's arm with the trend prior, plus the loss of every step."""
    extra = [*FLAGS, "--train.patience=0", "--checkpoint.resume=none"]
    result = train_speed.train_arm(code, data, run, steps, seed=0, recipe=RECIPE, extra=extra)
    losses = [json.loads(line)["loss"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    return {**result, "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", required=True, help="the commit to compare with")
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    data, old_code = generation_5(), worktree(args.against)
    runs = {}
    for arm, code in (("old", old_code), ("new", REPO)):
        runs[arm] = train_arm(code, data, REPO / "bench_data" / "trend_speed" / arm, args.steps)
        print(arm, {k: v for k, v in runs[arm].items() if k != "losses"}, flush=True)
    old, new = runs["old"], runs["new"]
    if old["targets"] != new["targets"]:
        sys.exit(f"the arms trained on different targets: {old['targets']} vs {new['targets']}")
    same = max(abs(a - b) for a, b in zip(old["losses"], new["losses"], strict=True))
    metrics = {
        "speedup": round(old["seconds"] / new["seconds"], 3),
        "tokens_per_s": round(new["tokens_per_s"], 1),
        "baseline_tokens_per_s": round(old["tokens_per_s"], 1),
        "seconds_per_step": round(new["seconds"] / args.steps, 3),
        "baseline_seconds_per_step": round(old["seconds"] / args.steps, 3),
        "ndcg@10": round(new["ndcg@10"], 4),
        "baseline_ndcg@10": round(old["ndcg@10"], 4),
        "max_loss_difference": same,
        "steps": args.steps,
    }
    result = {
        "benchmark": "trend_speed",
        "dataset": "MovieLens-1M users 1-2999, generations 1-5 of the continual bench (next-period validation on 5)",
        "command": f"python benchmarks/trend_speed.py --against {args.against} --steps {args.steps}",
        "machine": machine(),
        "metrics": metrics,
        "goal": "the trend prior under a full softmax: faster training, the same numbers (issue 15 needs it on ML-1M)",
        "notes": f"old = commit {args.against} (`bgpt train` from a git worktree), new = this tree; "
        f"{RECIPE.relative_to(REPO)} with {' '.join(FLAGS)}; seconds = training seconds (validation excluded); "
        "max_loss_difference = the largest difference of the logged losses, step by step",
    }
    rows = [
        f"# trend_speed: {result['dataset']}",
        "",
        f"`{result['command']}` on {result['machine']}",
        "",
        f"Speed-up (training seconds, old / new, same steps and samples): **{metrics['speedup']}x**; "
        f"largest difference of the logged losses: {same:g}.",
        "",
        "| arm | train seconds | s/step | targets/s | valid NDCG@10 (gen 5, at the last step) |",
        "|---|---|---|---|---|",
        *(
            f"| {arm} | {r['seconds']:,.1f} | {r['seconds'] / args.steps:.3f} | {r['tokens_per_s']:,.0f} | {r['ndcg@10']:.4f} |"
            for arm, r in runs.items()
        ),
    ]
    write_results("trend_speed", result, [*rows, "", result["notes"] + "."])


if __name__ == "__main__":
    main()
