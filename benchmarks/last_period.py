"""The continual benchmark's last period at fixed budgets: one command per arm set, no searches.

    python benchmarks/last_period.py sports --base-steps 2100 --full-steps 2700
    python benchmarks/last_period.py ml1m --base-steps 3400 --full-steps 3400 --tag x -- --model.trend_prior=true

The same six periods as benchmarks/continual_bench.py (event-count quantiles of time), but only the
last period is predicted, with budgets chosen beforehand on validation periods (the continual
bench's searches, or generation 5 of the next-period tables) instead of searched again here:

- full: ``bgpt train`` on generations 1-5 (p0-p4) for ``--full-steps``;
- incremental: ``bgpt train`` on p0-p1 for ``--base-steps``, then ``bgpt retrain`` on p2, p3 and p4
  in turn (``--retrain-epochs`` over the new events + a replay sample; or, with
  ``--retrain-candidates``, the budget that scored best on generation 5 after retrains on p2, p3);
- stale: the base model, never updated;
- the count baselines, fit on the same events (their settings chosen on the period before).

Every arm predicts every event of the last period (generation 6) from everything before it
(``bgpt eval --protocol next-period``: full ranking, earlier events of the period read as context,
online counts as the run's config says). Flags after ``--`` go to every ``bgpt train`` (a retrain
keeps its parent's config). Writes benchmarks/results/last_period_<dataset>[_<tag>].json and .md.
Restarting the same command reuses finished runs and appended generations (``--work`` to choose the
folder; default bench_data/last_period_<dataset>[_<tag>]).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from continual_bench import (
    BASELINES,
    CONFIGS,
    bgpt,
    compute,
    finished,
    periods,
    read_events,
    retrain,
    score,
    source_parser,
    write_period,
)
from continual_bench import _sources as sources
from shard_bench import REPO, machine, write_results

from trainer.next_period import flat_metrics

ARMS = ("incremental", "full", "stale")


def period_files(args, work: Path) -> list[Path]:
    """p0.csv-p5.csv in ``work`` (written once; an existing set is reused as it is)."""
    files = [work / f"p{k}.csv" for k in range(6)]
    if not all(f.exists() for f in files):
        users, items, times = read_events(work, sources(args)[0])
        for f, (a, b) in zip(files, periods(times), strict=True):
            write_period(f, users[a:b], items[a:b], times[a:b])
    return files


def append(data: Path, files: list[Path], k: int, items: list[str]) -> None:
    """Generation k + 1 of ``data`` is p<k> (an earlier invocation's appends are kept)."""
    manifest = data / "manifest.json"
    if manifest.exists() and len(json.loads(manifest.read_text())["generations"]) > k:
        return
    first = ["--overwrite", "--split", "none"] if k == 0 else ["--append"]
    bgpt("shard", "--input", str(files[k]), *items, "--out", str(data), *first)


def train(data: Path, out: Path, config: Path, steps: int, extra: list[str]) -> dict:
    if not finished(out):
        bgpt(
            "train", "--data", str(data), "--out", str(out), "--config", str(config), *extra,
            f"--train.max_steps={steps}", "--train.patience=0", "--train.max_minutes=none",
            "--train.eval_every=0", "--checkpoint.resume=none",
        )  # fmt: skip
    return {"run": out, **compute(out)}


DEFAULT_BUDGET = (4, 5e-4, 0.1)
"""Retrain epochs, learning rate, replay fraction (Sports' choice in the continual bench)."""


def budget_name(budget: tuple[int, float, float]) -> str:
    return "e{}_lr{:g}_replay{:g}".format(*budget)


def parse_budget(text: str) -> tuple[int, float, float]:
    try:
        epochs, lr, replay = text.split(":")
        return int(epochs), float(lr), float(replay)
    except ValueError:
        raise SystemExit(f"--retrain-candidates: {text!r} is not EPOCHS:LR:REPLAY (e.g. 8:1e-3:0.1)") from None


def choose_retrain(args, work: Path, files: list[Path], items: list[str], base: dict) -> tuple[tuple, dict]:
    """Each candidate retrain budget chains the base through p2 and p3 and is scored on generation 5
    (p4, the period before the last): (the best budget, {name: {"ndcg@10", "targets"}})."""
    stages = {k: work / f"d{k + 1}" for k in (2, 3)}  # the data at generation k + 1
    for k, folder in stages.items():
        for j in range(k + 1):
            append(folder, files, j, items)
    choice = {}
    for budget in args.retrain_candidates:
        epochs, lr, replay = budget
        inc = base
        for k, folder in stages.items():
            inc = retrain(inc["run"], folder, work / "choose" / f"{budget_name(budget)}_inc{k}", epochs, replay, lr)
        overall = score(inc["run"], work / "d5", 5)["scorers"]["model"]["overall"]
        choice[budget_name(budget)] = {"ndcg@10": overall["ndcg@10"], "targets": inc["targets"]}
        print(f"retrain budget {budget_name(budget)}: generation 5 NDCG@10 {overall['ndcg@10']:.4f}", flush=True)
    best = max(args.retrain_candidates, key=lambda b: choice[budget_name(b)]["ndcg@10"])
    return best, choice


def run_arms(args, work: Path, config: Path, extra: list[str]) -> tuple[dict, Path]:
    files, items = period_files(args, work), sources(args)[1]
    full_data, data = work / "d5", work / "d"
    for k in range(5):
        append(full_data, files, k, items)
    full = train(full_data, work / "full", config, args.full_steps, extra)
    append(data, files, 0, items)
    append(data, files, 1, items)
    base = train(data, work / "base", config, args.base_steps, extra)
    budget = (args.retrain_epochs, args.retrain_lr, args.replay_fraction)
    args.retrain_choice = None
    if args.retrain_candidates:
        budget, args.retrain_choice = choose_retrain(args, work, files, items, base)
        args.retrain_epochs, args.retrain_lr, args.replay_fraction = budget
    inc = base
    chain = work if budget == DEFAULT_BUDGET else work / budget_name(budget)  # the default's runs keep their place
    for k in (2, 3, 4):
        append(data, files, k, items)
        inc = retrain(inc["run"], data, chain / f"inc{k}", args.retrain_epochs, args.replay_fraction, args.retrain_lr)
    append(data, files, 5, items)
    return {"incremental": inc, "full": full, "stale": base}, data


def summarise(args, arms: dict, scored: dict, config: Path, extra: list[str]) -> dict:
    baselines = scored["baselines"]["scorers"]
    best_name = max(baselines, key=lambda b: baselines[b]["overall"]["ndcg@10"])
    best = baselines[best_name]["overall"]["ndcg@10"]
    model = {a: scored[a]["scorers"]["model"]["overall"]["ndcg@10"] for a in ARMS}
    metrics = {
        "incremental_ndcg@10": model["incremental"],
        "full_ndcg@10": model["full"],
        "stale_ndcg@10": model["stale"],
        "best_baseline_ndcg@10": best,
        "events_evaluated": scored["baselines"]["summary"]["scored"],
        "compute_ratio": round(arms["incremental"]["targets"] / max(1, arms["full"]["targets"]), 4),
        "incremental_over_best_baseline": round(model["incremental"] / max(1e-9, best), 4),
        "incremental_over_full": round(model["incremental"] / max(1e-9, model["full"]), 4),
    }
    for arm in ARMS:
        metrics.update({f"{arm}_{k.removeprefix('model_')}": v for k, v in flat_metrics(scored[arm]).items()})
    metrics.update(flat_metrics(scored["baselines"]))
    return {
        "benchmark": "last_period",
        "dataset": f"{args.dataset}: last of six periods cut at event quantiles (continual_bench.py), generation 6",
        "command": "python benchmarks/last_period.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "metrics": metrics,
        "best_baseline": best_name,
        "goal": "incremental NDCG@10 >= 1.5x the best baseline and >= 0.98x the full retrain at <= 25% of its "
        "training targets (issue 15)",
        "compute": {a: {k: v for k, v in r.items() if k != "run"} for a, r in arms.items()},
        "settings": {
            "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
            "extra_train_flags": extra,
            "base_steps": args.base_steps,
            "full_steps": args.full_steps,
            "retrain_epochs": args.retrain_epochs,
            "replay_fraction": args.replay_fraction,
            "retrain_lr": args.retrain_lr,
            "retrain_choice_generation_5": args.retrain_choice,
        },
        "scored": scored,
    }


def choice_lines(settings: dict) -> list[str]:
    """The retrain budgets tried on generation 5, when the budget was chosen there."""
    choice = settings.get("retrain_choice_generation_5")
    if not choice:
        return []
    chosen = budget_name((settings["retrain_epochs"], settings["retrain_lr"], settings["replay_fraction"]))
    rows = [
        f"| {n}{' (chosen)' if n == chosen else ''} | {c['ndcg@10']:.4f} | {c['targets']:,} |"
        for n, c in choice.items()
    ]
    head = ["", "Retrain budget, chosen on generation 5 (base -> p2 -> p3, every event of p4 scored):", ""]
    return [*head, "| budget | NDCG@10 | targets of the p3 retrain |", "|---|---|---|", *rows]


def report(result: dict, name: str) -> None:
    scored, m = result["scored"], result["metrics"]
    kinds = [b for b in BASELINES if b in scored["baselines"]["scorers"]]
    named = [(a, scored[a]["scorers"]["model"]) for a in ARMS]
    named += [(b, scored["baselines"]["scorers"][b]) for b in kinds]
    groups = list(named[0][1]["breakdown"])
    targets = {a: result["compute"][a]["targets"] for a in ARMS}
    lines = [
        f"# Last period: {name.removeprefix('last_period_')}",
        "",
        f"`{result['command']}` on {result['machine']}",
        "",
        f"Every event of the last period ({m['events_evaluated']:,} events), predicted from everything before it "
        "(next-period protocol, full ranking). Targets: training targets of each arm's final run.",
        "",
        "| scorer | NDCG@10 | HR@10 | MRR | targets |",
        "|---|---|---|---|---|",
        *(
            f"| {label} | {s['overall']['ndcg@10']:.4f} | {s['overall']['hr@10']:.4f} | {s['overall']['mrr']:.4f} | "
            f"{targets[label]:,} |"
            if label in targets
            else f"| {label} | {s['overall']['ndcg@10']:.4f} | {s['overall']['hr@10']:.4f} | "
            f"{s['overall']['mrr']:.4f} | - |"
            for label, s in named
        ),
        "",
        f"incremental / best baseline ({result['best_baseline']}) = {m['incremental_over_best_baseline']:.2f}x; "
        f"incremental / full = {m['incremental_over_full']:.2f}x at {m['compute_ratio']:.1%} of its training targets.",
        *choice_lines(result["settings"]),
        "",
        "Breakdown (NDCG@10, events):",
        "",
        "| scorer | " + " | ".join(groups) + " |",
        "|---" * (len(groups) + 1) + "|",
        *(
            f"| {label} | "
            + " | ".join(
                f"{c['ndcg@10']:.4f} ({c['count']:,})" if c else "-" for c in (s["breakdown"].get(g) for g in groups)
            )
            + " |"
            for label, s in named
        ),
    ]
    write_results(name, result, lines)


def main() -> None:
    parser = source_parser(__doc__)
    parser.add_argument("--base-steps", type=int, required=True, help="steps of the base run on p0-p1")
    parser.add_argument("--full-steps", type=int, required=True, help="steps of the full run on p0-p4")
    parser.add_argument("--retrain-epochs", type=int, default=DEFAULT_BUDGET[0])
    parser.add_argument("--replay-fraction", type=float, default=DEFAULT_BUDGET[2])
    parser.add_argument("--retrain-lr", type=float, default=DEFAULT_BUDGET[1])
    parser.add_argument(
        "--retrain-candidates",
        nargs="+",
        type=parse_budget,
        metavar="EPOCHS:LR:REPLAY",
        help="retrain budgets to choose from on generation 5 (the period before the last) instead of the three "
        "flags above: each chains the base through p2 and p3 and is scored there; the best runs the chain",
    )
    parser.add_argument("--tag", help="suffix of the result and work folder names")
    parser.add_argument("--work", help="work folder (default: bench_data/last_period_<dataset>[_<tag>])")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    name = f"last_period_{args.dataset}" + (f"_{args.tag}" if args.tag else "")
    config = Path(args.config) if args.config else CONFIGS / f"continual_{args.dataset}.yaml"
    work = Path(args.work) if args.work else REPO / "bench_data" / name
    work.mkdir(parents=True, exist_ok=True)
    arms, data = run_arms(args, work, config, extra)
    scored = {"baselines": score(None, data, 6)}
    for arm, record in arms.items():
        scored[arm] = score(record["run"], data, 6)
    report(summarise(args, arms, scored, config, extra), name)


if __name__ == "__main__":
    main()
