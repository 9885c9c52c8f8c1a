"""The sync-free step on CPU: this tree's training step against an earlier commit's, Amazon Sports.

    python benchmarks/sync_free_step.py --against 31ec17e --steps 4000 --seeds 0,1

Three arms of `bgpt train` of the Sports recipe (benchmarks/configs/sports_refit.yaml: sampled
softmax with in-batch targets + 256 uniform negatives, item attributes), alternating, one seed at a
time, each on the same samples in the same order:

- ``old``: the commit REV (a git worktree): the sampled softmax over the *unique* candidates;
- ``new``: this tree's CPU default: the sampled softmax over every draw with accidental hits
  masked (no ``unique``), target positions gathered first (``heads.sync_free`` off on CPU);
- ``sync_free``: this tree with ``--heads.sync_free=true`` (what a GPU runs by default): every
  position a loss row, no host sync in the step; on CPU it computes the padding positions too.

Speed = training seconds for the same steps (validation excluded); validation NDCG@10 at the last
step says whether the changed estimator learns as well, beside the count baselines on the same
events. Writes benchmarks/results/sync_free_step.json/.md.
"""

from __future__ import annotations

import argparse
import sys

from shard_bench import REPO, machine, write_results
from train_speed import count_baselines, sports_with_items, train_arm, worktree

ARMS = {"old": [], "new": [], "sync_free": ["--heads.sync_free=true"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", metavar="REV", required=True, help="the commit to compare with")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", default="0,1")
    args = parser.parse_args()
    data, old_code = sports_with_items(), worktree(args.against)
    seeds = [int(s) for s in args.seeds.split(",")]
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in seeds:
        for arm, flags in ARMS.items():
            code = old_code if arm == "old" else REPO
            run = REPO / "bench_data" / "sync_free_step" / f"{arm}_seed{seed}"
            runs[arm].append({"seed": seed, **train_arm(code, data, run, args.steps, seed, extra=flags)})
            print(arm, runs[arm][-1], flush=True)
    if len({tuple(r["targets"] for r in rs) for rs in runs.values()}) != 1:
        sys.exit(f"the arms trained on different targets: {runs}")
    mean = {arm: {k: sum(r[k] for r in rs) / len(rs) for k in rs[0] if k != "seed"} for arm, rs in runs.items()}
    metrics = {"steps": args.steps, **count_baselines(data)}
    for arm, m in mean.items():
        prefix = "" if arm == "new" else f"{arm}_"
        metrics[f"{prefix}tokens_per_s"] = round(m["tokens_per_s"], 1)
        metrics[f"{prefix}ndcg@10"] = round(m["ndcg@10"], 4)
        metrics[f"{prefix}hr@10"] = round(m["hr@10"], 4)
        if arm != "old":
            metrics[f"{prefix}speedup"] = round(mean["old"]["seconds"] / m["seconds"], 3)
    command = f"python benchmarks/sync_free_step.py --against {args.against} --steps {args.steps} --seeds {args.seeds}"
    result = {
        "benchmark": "sync_free_step",
        "dataset": "Amazon Sports 5-core with item attributes, leave-one-out validation (all items ranked)",
        "command": command,
        "machine": machine(),
        "metrics": metrics,
        "goal": "issue 19: a sync-free step (no host sync, test) that learns as well as today's; CPU speed reported",
        "runs": runs,
        "notes": f"old = commit {args.against} (`bgpt train` from a git worktree); new = this tree (CPU default); "
        "sync_free = this tree with --heads.sync_free=true; recipe benchmarks/configs/sports_refit.yaml for "
        f"{args.steps} steps, validation at the last step only, checkpoints off; seconds = training seconds; "
        "metrics without a prefix are the new arm's (means over seeds); speedup = old seconds / arm seconds",
    }
    rows = [
        f"# sync_free_step: {result['dataset']}",
        "",
        f"`{command}` on {result['machine']}",
        "",
        f"Count baselines on the same validation events: popularity NDCG@10 {metrics['popularity_ndcg@10']}, "
        f"transition {metrics['transition_ndcg@10']}.",
        "",
        "| arm | seed | train seconds | targets/s | valid NDCG@10 | valid HR@10 |",
        "|---|---|---|---|---|---|",
        *(
            f"| {arm} | {r['seed']} | {r['seconds']:,.0f} | {r['tokens_per_s']:,.0f} | {r['ndcg@10']:.4f} | {r['hr@10']:.4f} |"
            for arm, rs in runs.items()
            for r in rs
        ),
    ]
    write_results("sync_free_step", result, [*rows, "", result["notes"] + "."])


if __name__ == "__main__":
    main()
