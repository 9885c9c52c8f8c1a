"""Continual learning, judged where it is deployed: predict the next period from everything before it.

    python benchmarks/continual_bench.py ml1m
    python benchmarks/continual_bench.py sports
    python benchmarks/continual_bench.py NAME --input events.parquet [--items items.csv] [--format ...]

Periods. The events are cut at event-count quantiles of time (never inside one second) into the
base period (two generations: 0-62.5% and 62.5-70%), three increments (70-77.5, 77.5-85,
85-92.5%) and the last period (92.5-100%), appended one generation at a time to one dataset
(``--split none``: every event trains). After each increment, three arms and the count baselines
predict every event of the next period from everything before it (``bgpt eval --protocol
next-period``: full ranking, earlier events of the period read as context, history excluded as
the config says):

- (a) incremental: ``bgpt retrain`` of the previous incremental model on the new generation (its
  events + a replay sample); its budget (epochs) is chosen once, on the period after increment 1.
- (b) full: a model trained from scratch to convergence: early stopping while predicting its
  newest generation from the ones before (``data.validate_on_newest``), then a refit on every
  generation for the chosen number of steps. Its compute is the refit's (the search is reported).
- (c) stale: the base model (trained the same way as (b) on the base period), never updated.
- baselines: popularity, recent popularity and item-to-item transitions, fit on the same events.

Compute = training targets (and seconds) of each arm's final model. Forgetting: every arm on the
base period's newest generation (which all of them trained on) after the last increment.
Writes benchmarks/results/continual_<name>.json, .md and _curves.png after every increment (marked
partial until the last one). Restarting the same command resumes: generations already appended and
runs that finished (their metrics.json written) are reused; an interrupted run starts over.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from shard_bench import REPO, SHARED, machine, write_results

from data_sharding import shards
from data_sharding.stream import iter_sequences
from trainer.next_period import flat_metrics
from trainer.run import evaluate_on_period

BGPT = [sys.executable, "-m", "launch.cli"]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "benchmarks" / "configs"
CUTS = (0.625, 0.70, 0.775, 0.85, 0.925)
BASELINES = ["popularity", "recent-popularity", "recent-popularity-online", "transition", "transition-online"]
DATASETS = {
    "ml1m": (
        [str(SHARED / "ml-1m" / "ratings_users_0001-2999.dat"), "--format", "movielens"],
        [str(SHARED / "ml-1m" / "movies.dat"), "--items-format", "movielens"],
    ),
    "sports": ([str(SHARED / "amazon-sports" / "interactions.csv")], [str(SHARED / "amazon-sports" / "items.csv")]),
}


def bgpt(*args: str) -> dict:
    """Run a bgpt command; its last JSON line."""
    done = subprocess.run([*BGPT, *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bgpt {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def read_events(work: Path, source: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, ms) of every valid event of the input, read through `bgpt shard` (any format it
    reads), sorted by time (a user's equal-time events keep their order)."""
    raw = work / "raw"
    bgpt("shard", "--input", *source, "--out", str(raw), "--overwrite", "--split", "none")
    manifest = shards.load_manifest(raw)
    items = pq.read_table(raw / manifest["vocab"]["files"]["items"], columns=["item"])["item"].to_pylist()
    users = pq.read_table(raw / manifest["vocab"]["files"]["users"], columns=["uidx", "user"])
    user_name = dict(zip(users["uidx"].to_pylist(), users["user"].to_pylist(), strict=True))
    rows_user, rows_item, rows_ts = [], [], []
    for uidx, events in iter_sequences(raw):
        rows_user += [user_name[int(uidx)]] * len(events)
        rows_item += [items[i] for i in events["item"]]
        rows_ts.append(events["ts"])
    ts = np.concatenate(rows_ts)
    order = np.argsort(ts, kind="stable")
    return np.array(rows_user, dtype=object)[order], np.array(rows_item, dtype=object)[order], ts[order]


def periods(times: np.ndarray) -> list[tuple[int, int]]:
    """Index ranges [start, end) of the six periods (see the module docstring)."""
    bounds = [0, *(int(q * len(times)) for q in CUTS), len(times)]
    for k in range(1, len(bounds) - 1):  # never split events of the same millisecond
        while bounds[k] < len(times) and times[bounds[k]] == times[bounds[k] - 1]:
            bounds[k] += 1
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def write_period(path: Path, users, items, times) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "ts"])
        w.writerows(zip(users, items, times, strict=True))
    return path


def finished(run: Path) -> bool:
    """A run of an earlier, interrupted invocation that completed (train writes metrics.json last)."""
    if (run / "metrics.json").exists():
        print(f"reusing finished run {run}", flush=True)
        return True
    return False


def train_full(name: str, data: Path, work: Path, config: Path, minutes: float) -> dict:
    """Arm (b) at the data's newest generation: search with early stopping on the newest
    generation, then refit on everything for the chosen steps. The refit run is the model."""
    search, refit = work / f"{name}_search", work / name
    if not finished(search):
        bgpt(
            "train", "--data", str(data), "--out", str(search), "--config", str(config),
            "--data.validate_on_newest=true", f"--train.max_minutes={minutes}", "--checkpoint.resume=none",
        )  # fmt: skip
    best = json.loads((search / "metrics.json").read_text())
    steps = int(best["best_step"])
    if not finished(refit):
        bgpt(
            "train", "--data", str(data), "--out", str(refit), "--config", str(config), f"--train.max_steps={steps}",
            "--train.max_minutes=none", "--train.patience=0", "--checkpoint.resume=none",
        )  # fmt: skip
    return {
        "run": refit,
        "steps": steps,
        "search_valid_ndcg@10": best["ndcg@10"],
        "search_targets": best["train"]["tokens"],
        "search_seconds": best["train"]["seconds"],
        **compute(refit),
    }


def compute(run: Path) -> dict:
    train = json.loads((run / "metrics.json").read_text())["train"]
    return {"targets": int(train["tokens"]), "seconds": round(train["seconds"], 1), "steps": int(train["step"])}


def retrain(parent: Path, data: Path, out: Path, epochs: int, replay: float, lr: float) -> dict:
    if not finished(out):
        bgpt(
            "retrain", "--run", str(parent), "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--replay-fraction", str(replay), f"--train.lr={lr}", "--train.warmup_steps=20",
            "--checkpoint.resume=none",
        )  # fmt: skip
    return {"run": out, **compute(out)}


def score(run: Path | None, data: Path, generation: int, ks=(10,)) -> dict:
    """Next-period result of a run (or, with None, the baselines) on ``generation``: named, not the
    data's newest, because a resumed invocation finds generations that later increments appended."""
    quiet = {"generation": generation, "ks": list(ks), "log": lambda *a: None}
    if run is None:
        return evaluate_on_period([], data, baseline_kinds=BASELINES, **quiet)
    return evaluate_on_period([run], data, **quiet)


def source_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments naming the events (a named dataset or any file) and the run configuration."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="ml1m, sports, or a name for --input")
    parser.add_argument("--input", nargs="+", help="event files (any format bgpt shard reads)")
    parser.add_argument("--items", help="item metadata file")
    parser.add_argument("--format", help="events format (default: by extension)")
    parser.add_argument("--items-format", help="items format")
    parser.add_argument("--config", help="run configuration (default: benchmarks/configs/continual_<dataset>.yaml)")
    return parser


def main() -> None:
    parser = source_parser(__doc__)
    parser.add_argument("--search-minutes", type=float, default=15, help="time cap of each early-stopping search")
    parser.add_argument("--retrain-epochs", default="1,2,4", help="incremental budgets tried on increment 1")
    parser.add_argument("--replay-fraction", type=float, default=0.1)
    parser.add_argument("--retrain-lr", type=float, default=5e-4)
    parser.add_argument("--report-only", action="store_true", help="rebuild the .md and .png from the .json")
    args = parser.parse_args()
    name = f"continual_{args.dataset}"
    if args.report_only:
        return report(json.loads((RESULTS / f"{name}.json").read_text()), name)
    source, items = _sources(args)
    config = Path(args.config) if args.config else CONFIGS / f"continual_{args.dataset}.yaml"
    work = REPO / "bench_data" / name
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    users, item_ids, times = read_events(work, source)
    spans = periods(times)
    files = [
        write_period(work / f"p{k}.csv", *(x[a:b] for x in (users, item_ids, times))) for k, (a, b) in enumerate(spans)
    ]
    data = work / "data"

    def append(k: int) -> None:
        manifest = data / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["generations"]) > k:
            return  # appended by an earlier, interrupted invocation
        first = ["--overwrite", "--split", "none"] if k == 0 else ["--append"]
        bgpt("shard", "--input", str(files[k]), *items, "--out", str(data), *first)

    append(0)
    append(1)
    base = train_full("base", data, work, config, args.search_minutes)
    append(2)
    arms = {"incremental": base, "full": base, "stale": base}
    budgets = [int(e) for e in args.retrain_epochs.split(",")]
    series, epochs = [], None
    for k in (1, 2, 3):  # the data's newest generation (k + 2) is increment k
        if epochs is None:  # increment 1: try each incremental budget, keep the best on the next period
            candidates = {
                e: retrain(base["run"], data, work / f"inc1_e{e}", e, args.replay_fraction, args.retrain_lr)
                for e in budgets
            }
        else:
            candidates = {
                epochs: retrain(
                    arms["incremental"]["run"], data, work / f"inc{k}", epochs, args.replay_fraction, args.retrain_lr
                )
            }
        full = train_full(f"full{k}", data, work, config, args.search_minutes)
        append(k + 2)  # the next period, predicted by every arm
        if epochs is None:
            tried = {
                e: score(c["run"], data, k + 3)["scorers"]["model"]["overall"]["ndcg@10"] for e, c in candidates.items()
            }
            epochs = max(tried, key=tried.get)
            print(json.dumps({"incremental_budget_epochs": tried, "chosen": epochs}), flush=True)
        arms = {"incremental": candidates[epochs], "full": full, "stale": base}
        point = {"increment": k, "eval_generation": k + 3, "compute": {a: _public(v) for a, v in arms.items()}}
        point["baselines"] = score(None, data, k + 3)
        for arm, record in arms.items():
            point[arm] = score(record["run"], data, k + 3)
        series.append(point)
        print(
            json.dumps({"increment": k, **{a: point[a]["scorers"]["model"]["overall"]["ndcg@10"] for a in arms}}),
            flush=True,
        )
        forgetting = measure_forgetting(arms, data) if k == 3 else None
        report(summarise(args, series, forgetting, epochs, config, time.perf_counter() - started), name)


def _public(record: dict) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in record.items()}


def _sources(args) -> tuple[list[str], list[str]]:
    if args.input:
        source = [*args.input, *(["--format", args.format] if args.format else [])]
        items = (
            [args.items, *(["--items-format", args.items_format] if args.items_format else [])] if args.items else []
        )
    elif args.dataset in DATASETS:
        source, items = DATASETS[args.dataset]
    else:
        raise SystemExit(f"unknown dataset {args.dataset!r}: use ml1m, sports, or --input FILE")
    return source, (["--items", *items] if items else [])


def measure_forgetting(arms: dict, data: Path) -> dict:
    """NDCG@10 of each final arm on generation 2 (the base period's newest events, which every arm
    trained on): what the incremental chain kept of the base period after three increments."""
    out = {}
    for arm, record in arms.items():
        result = evaluate_on_period([record["run"]], data, generation=2, ks=[10], log=lambda *a: None)
        out[arm] = result["scorers"]["model"]["overall"]["ndcg@10"]
    out["relative_drop"] = round(1 - out["incremental"] / max(1e-9, out["stale"]), 4)
    return out


def summarise(args, series: list[dict], forgetting: dict, epochs: int, config: Path, seconds: float) -> dict:
    last = series[-1]
    baselines = last["baselines"]["scorers"]
    best_name = max(baselines, key=lambda b: baselines[b]["overall"]["ndcg@10"])
    best = baselines[best_name]["overall"]["ndcg@10"]
    inc, full = last["compute"]["incremental"], last["compute"]["full"]
    metrics = {
        "incremental_ndcg@10": last["incremental"]["scorers"]["model"]["overall"]["ndcg@10"],
        "full_ndcg@10": last["full"]["scorers"]["model"]["overall"]["ndcg@10"],
        "stale_ndcg@10": last["stale"]["scorers"]["model"]["overall"]["ndcg@10"],
        "best_baseline_ndcg@10": best,
        "events_evaluated": last["baselines"]["summary"]["scored"],
        "compute_ratio": round(inc["targets"] / max(1, full["targets"]), 4),
        "compute_ratio_seconds": round(inc["seconds"] / max(1e-9, full["seconds"]), 4),
    }
    if forgetting:
        metrics["forgetting_relative_drop"] = forgetting["relative_drop"]
    for arm in ("incremental", "full", "stale"):
        metrics.update({f"{arm}_{k.removeprefix('model_')}": v for k, v in flat_metrics(last[arm]).items()})
    metrics.update(flat_metrics(last["baselines"]))
    metrics["incremental_over_best_baseline"] = round(metrics["incremental_ndcg@10"] / max(1e-9, best), 4)
    metrics["incremental_over_full"] = round(metrics["incremental_ndcg@10"] / max(1e-9, metrics["full_ndcg@10"]), 4)
    return {
        "benchmark": "continual",
        "dataset": f"{args.dataset}: base (2 generations) + 3 increments + last period, cut at event quantiles {CUTS}",
        "increments_completed": len(series),
        "partial": len(series) < 3,
        "command": "python benchmarks/continual_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "metrics": metrics,
        "best_baseline": best_name,
        "goal": "incremental NDCG@10 >= 1.5x the best baseline and >= 0.98x the converged full retrain at "
        "<= 25% of its compute (training targets), on the last period",
        "series": series,
        "forgetting": forgetting,
        "settings": {
            "config": str(config.relative_to(REPO)) if config.is_relative_to(REPO) else str(config),
            "model": (config.read_text() if config.exists() else ""),
            "retrain_epochs_chosen": epochs,
            "replay_fraction": args.replay_fraction,
            "retrain_lr": args.retrain_lr,
            "search_minutes": args.search_minutes,
        },
        "bench_seconds": round(seconds, 1),
    }


def scored_baselines(result: dict) -> list[str]:
    """The baselines a result holds (one written before a baseline was added lacks it)."""
    return [b for b in BASELINES if b in result["series"][0]["baselines"]["scorers"]]


def report(result: dict, name: str) -> None:
    rows = []
    kinds = scored_baselines(result)
    for p in result["series"]:
        base = p["baselines"]["scorers"]
        cells = [p[a]["scorers"]["model"]["overall"]["ndcg@10"] for a in ("incremental", "full", "stale")]
        cells += [base[b]["overall"]["ndcg@10"] for b in kinds]
        compute = p["compute"]
        rows.append(
            f"| {p['increment']} | {p['baselines']['summary']['scored']:,} | "
            + " | ".join(f"{c:.4f}" for c in cells)
            + f" | {compute['incremental']['targets']:,} | {compute['full']['targets']:,} |"
        )
    last = result["series"][-1]
    groups = list(last["incremental"]["scorers"]["model"]["breakdown"])
    breakdown = ["| scorer | " + " | ".join(groups) + " |", "|---" * (len(groups) + 1) + "|"]
    named = [(a, last[a]["scorers"]["model"]) for a in ("incremental", "full", "stale")]
    named += [(b, last["baselines"]["scorers"][b]) for b in kinds]
    for label, scores in named:
        cells = [scores["breakdown"].get(g) for g in groups]
        breakdown.append(
            f"| {label} | " + " | ".join(f"{c['ndcg@10']:.4f} ({c['count']:,})" if c else "-" for c in cells) + " |"
        )
    m, f = result["metrics"], result["forgetting"]
    lines = [
        f"# Continual: {name.removeprefix('continual_')}",
        "",
        f"`{result['command']}` on {result['machine']}",
        "",
        "NDCG@10 on every event of the period after each increment, predicted from everything before it "
        "(next-period protocol, full ranking); targets = training targets of each arm's final model.",
        "",
        "| increment | events | incremental | full retrain | stale | " + " | ".join(kinds) + " "
        "| incremental targets | full targets |",
        "|---" * (7 + len(kinds)) + "|",
        *rows,
        "",
        *(
            [
                f"**Partial**: {result['increments_completed']} of 3 increments completed; the figures below are for "
                f"the period after increment {result['increments_completed']}, not the last period.",
                "",
            ]
            if result.get("partial")
            else []
        ),
        f"Period after the newest increment: incremental / best baseline ({result['best_baseline']}) = "
        f"{m['incremental_over_best_baseline']:.2f}x; incremental / full = {m['incremental_over_full']:.2f}x at "
        f"{m['compute_ratio']:.1%} of its compute. Breakdown of the last period (NDCG@10, events):",
        "",
        *breakdown,
        "",
        *(
            [
                f"Forgetting (generation 2, the base period's newest events, which every arm trained on), NDCG@10: "
                f"stale {f['stale']:.4f}, incremental {f['incremental']:.4f}, full {f['full']:.4f} "
                f"(incremental vs stale: {-f['relative_drop']:+.1%}).",
                "",
            ]
            if f
            else []
        ),
        f"![curves]({name}_curves.png)",
    ]
    write_results(name, result, lines)
    plot(result, RESULTS / f"{name}_curves.png", name)


def plot(result: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    series = result["series"]
    x = [p["increment"] for p in series]
    for arm, label in (("incremental", "(a) incremental"), ("full", "(b) full retrain"), ("stale", "(c) stale")):
        ax.plot(x, [p[arm]["scorers"]["model"]["overall"]["ndcg@10"] for p in series], marker="o", label=label)
    for b in scored_baselines(result):
        values = [p["baselines"]["scorers"][b]["overall"]["ndcg@10"] for p in series]
        ax.plot(x, values, linestyle="--", marker=".", label=b)
    ax.set_xlabel("increment")
    ax.set_xticks(x)
    ax.set_ylabel("NDCG@10 on the next period (every event)")
    ax.set_title(f"{name.removeprefix('continual_')}: models and count baselines", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
