"""Continual learning benchmark: incremental retrain vs full retrain vs a stale model, over time.

    python benchmarks/continual_bench.py ml1m
    python benchmarks/continual_bench.py sports

Temporal protocol. The events are cut at event-count quantiles of time into a base period
(before T0 = the 70% quantile), three increments (70-77.5%, 77.5-85%, 85-92.5%) and a last
period (92.5-100%). The base period is sharded (generation 1) and a model is trained from scratch.
Then for each increment k: `bgpt shard --append` adds it (generation k+1), and
  (a) incremental: `bgpt retrain` from the previous incremental model (new events + 10% replay),
  (b) full: `bgpt train` from scratch on everything so far, with the base model's budget in epochs,
  (c) stale: the base model, never updated.
Each is evaluated on the period after the increment: for every user with history before that
period, predict the user's first event in it from the events before it (full ranking over the
model's catalogue; an item the model has never seen counts as a miss). Compute = training targets
processed (`metrics.json` train.tokens). Forgetting: after the last increment, (a) is evaluated
again on the earlier evaluation periods and compared with its score when they were next.
Writes benchmarks/results/continual_<dataset>.json, .md and _curves.png.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from shard_bench import REPO, SHARED, machine

from data_sharding import shards
from data_sharding.stream import collate_windows
from trainer import checkpoint as ckpt
from trainer.evaluate import EvalConfig, evaluate_batches
from trainer.factory import build_model
from trainer.retrain import grow_and_load
from trainer.run import load_run_config

BGPT = [sys.executable, "-m", "launch.cli"]
RESULTS = REPO / "benchmarks" / "results"
CUTS = (0.70, 0.775, 0.85, 0.925)
# SASRec-size model from scratch (the benchmark is about the update strategy, not the backbone).
MODEL = [
    "--backbone",
    "scratch",
    "--num-layers",
    "2",
    "--max-len",
    "50",
    "--model.hidden_size=64",
    "--model.item_attributes=false",
    "--heads.type_weight=0",
    "--heads.time_weight=0",
    "--heads.value_weight=0",
    "--train.micro_batch_size=128",
    "--train.warmup_steps=50",
    "--train.eval_every=0",
    "--train.patience=0",
    "--train.log_every=20",
    "--checkpoint.every_steps=0",
]


def read_events(dataset: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, unix seconds) of the raw log, as strings and int64."""
    users, items, times = [], [], []
    if dataset == "ml1m":
        with open(SHARED / "ml-1m" / "ratings_users_0001-2999.dat", encoding="latin-1") as f:
            for line in f:
                u, i, _, t = line.rstrip("\n").split("::")
                users.append(u), items.append(i), times.append(int(t))
    else:
        with open(SHARED / "amazon-sports" / "interactions.csv") as f:
            for row in csv.DictReader(f):
                users.append(row["user_id"]), items.append(row["item_id"]), times.append(int(row["timestamp"]))
    order = np.argsort(np.array(times, dtype=np.int64), kind="stable")
    return np.array(users, dtype=object)[order], np.array(items, dtype=object)[order], np.array(times, np.int64)[order]


def periods(times: np.ndarray) -> list[tuple[int, int]]:
    """Index ranges [start, end) of the base period, 3 increments and the last period."""
    bounds = [0, *(int(q * len(times)) for q in CUTS), len(times)]
    # Never split events of the same second across periods.
    for k in range(1, len(bounds) - 1):
        while bounds[k] < len(times) and times[bounds[k]] == times[bounds[k] - 1]:
            bounds[k] += 1
    return [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]


def write_period(path: Path, users, items, times) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user", "item", "ts"])
        w.writerows(zip(users, items, times, strict=True))
    return path


def bgpt(*args: str) -> dict:
    done = subprocess.run([*BGPT, *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bgpt {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def eval_windows(
    users, items, times, start: int, end: int, data: Path, max_len: int, targets: dict[str, int] | None = None
) -> list[np.ndarray]:
    """One window per user active in [start, end) with earlier history: the history before the
    user's first event in the period, then that event (ids from the dataset's current vocabulary).
    ``targets``: user -> row of the event to predict instead (its history: the user's rows before it)."""
    manifest = shards.load_manifest(data)
    table = pq.read_table(data / manifest["vocab"]["files"]["items"], columns=["id", "item"])
    ids = dict(zip(table["item"].to_pylist(), table["id"].to_pylist(), strict=True))
    scale = 1000 if manifest["time_unit"] == "ms" else 1
    first: dict[str, int] = {}
    for n in range(start, end):
        first.setdefault(users[n], n)
    if targets is not None:
        first = targets
    history: dict[str, list[int]] = {}  # each user's rows before the one to predict
    for n in range(max(first.values(), default=0)):
        if n < first.get(users[n], -1):
            history.setdefault(users[n], []).append(n)
    windows = []
    for user, n in first.items():
        past = history.get(user)
        if not past:
            continue
        rows = [*past[-max_len:], n]
        w = np.zeros(len(rows), dtype=shards.SEQ_DTYPE)
        # Unknown items map to UNK (1): in the history it is a generic token; as the target it
        # is never ranked, i.e. a miss.
        w["item"] = [ids.get(items[r], 1) for r in rows]
        w["ts"] = [times[r] * scale for r in rows]
        w["type"] = 1
        w["value"] = np.nan
        windows.append(w)
    return windows


def probe_windows(users, items, times, end: int, data: Path, max_len: int, replay_fraction: float) -> list[np.ndarray]:
    """The forgetting probe: per base-period user (>= 2 events), the last base event predicted from
    the ones before it. No model trains on it: it is the base generation's test event, and the
    incremental retrains only train on new events, plus the whole histories of their replay
    sample, whose users are left out here (the same seeded sample in every retrain)."""
    from data_sharding.stream import ShardDataset, StreamConfig

    last: dict[str, int] = {}
    count: dict[str, int] = {}
    for n in range(end):
        last[users[n]] = n
        count[users[n]] = count.get(users[n], 0) + 1
    manifest = shards.load_manifest(data)
    table = pq.read_table(data / manifest["vocab"]["files"]["users"], columns=["uidx", "user"])
    uidx = dict(zip(table["user"].to_pylist(), table["uidx"].to_pylist(), strict=True))
    sampler = ShardDataset(data, StreamConfig(focus_new=True, replay_fraction=replay_fraction))
    keep = {u for u in last if count[u] >= 2 and not sampler.replayed(uidx[u])}
    windows = eval_windows(users, items, times, 0, end, data, max_len, targets={u: last[u] for u in keep})
    return windows


def evaluate(run: Path, data: Path, windows: list[np.ndarray], ranks: bool = False) -> dict:
    """The run's latest weights on the current catalogue: items it never trained on are unknown
    to it (UNK in histories, a miss as targets, never recommended)."""
    cfg = load_run_config(run)
    source = ckpt.latest_valid(run, log=lambda *a: None)
    model, _ = build_model(cfg.model, cfg.lora, cfg.heads, data)
    grow_and_load(model, source, log=lambda *a: None)
    known = ckpt.load_weights(source)["items.ids.weight"].shape[0]
    for w in windows:
        w["item"] = np.where(w["item"] < known, w["item"], 1)
    batches = (collate_windows(list(range(len(chunk))), chunk) for chunk in _chunks(windows, 256))
    metrics = evaluate_batches(model, batches, EvalConfig(ks=[10]), torch.device("cpu"), known_items=known, ranks=ranks)
    return {k: metrics[k] for k in ("hr@10", "ndcg@10", "mrr", "count", "ranks") if k in metrics}


def paired_bootstrap(ranks_a: np.ndarray, ranks_b: np.ndarray, samples: int = 2000, seed: int = 0) -> dict:
    """95% interval of NDCG@10(a) - NDCG@10(b) over users resampled with replacement (paired)."""
    gain = lambda r: np.where(r < 10, 1 / np.log2(r + 2), 0.0)  # noqa: E731
    diff = gain(ranks_a) - gain(ranks_b)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(samples)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"difference": round(float(diff.mean()), 5), "ci95": [round(float(low), 5), round(float(high), 5)]}


def measure_significance(work: Path, data: Path, users, items, times, spans) -> dict:
    """Paired bootstrap on the last evaluation period: incremental vs stale and vs full retrain."""
    a, b = spans[4]
    windows = eval_windows(users, items, times, a, b, data, 50)
    ranks = {name: evaluate(work / f"run_{name}", data, [w.copy() for w in windows], ranks=True)["ranks"]
             for name in ("inc3", "full3", "base")}  # fmt: skip
    return {
        "users": len(windows),
        "incremental_minus_stale": paired_bootstrap(ranks["inc3"], ranks["base"]),
        "incremental_minus_full": paired_bootstrap(ranks["inc3"], ranks["full3"]),
    }


def _chunks(seq: list, size: int):
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def measure_forgetting(work: Path, data: Path, users, items, times, spans, replay_fraction: float) -> dict:
    """NDCG@10 on the base-period probe (see probe_windows) of the base model and each incremental
    model; the drop from base to the last increment is the forgetting. The full retrain of the last
    increment is shown for reference only: it trained on the probe events."""
    windows = probe_windows(users, items, times, spans[0][1], data, 50, replay_fraction)
    out: dict = {"probe_users": len(windows)}
    for name in ("base", "inc1", "inc2", "inc3", "full3"):
        metrics = evaluate(work / f"run_{name}", data, [w.copy() for w in windows])
        key = "full3_trained_on_probe" if name == "full3" else name
        out[key] = {"ndcg@10": metrics["ndcg@10"], "hr@10": metrics["hr@10"]}
    out["relative_drop"] = round(1 - out["inc3"]["ndcg@10"] / max(1e-9, out["base"]["ndcg@10"]), 4)
    return out


def significance_line(sig: dict) -> str:
    s, f = sig["incremental_minus_stale"], sig["incremental_minus_full"]
    return (
        f"Paired bootstrap over the {sig['users']} users of the last period (2,000 resamples), NDCG@10 "
        f"difference [95% interval]: incremental - stale {s['difference']:+.4f} [{s['ci95'][0]:+.4f}, "
        f"{s['ci95'][1]:+.4f}]; incremental - full {f['difference']:+.4f} [{f['ci95'][0]:+.4f}, {f['ci95'][1]:+.4f}]."
    )


def forgetting_line(forgetting: dict) -> str:
    f = forgetting
    return (
        f"Forgetting probe ({f['probe_users']} base-period users outside the replay sample: each one's last "
        f"base-period event, never a training target of the base or incremental models), NDCG@10: "
        f"base {f['base']['ndcg@10']:.4f} -> after increments 1/2/3: {f['inc1']['ndcg@10']:.4f} / "
        f"{f['inc2']['ndcg@10']:.4f} / {f['inc3']['ndcg@10']:.4f} (relative drop {f['relative_drop']:.1%}); "
        f"the last full retrain, which trained on these events, {f['full3_trained_on_probe']['ndcg@10']:.4f}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=("ml1m", "sports"))
    parser.add_argument("--epochs", type=int, default=8, help="epochs of the base and every full retrain")
    parser.add_argument("--replay-fraction", type=float, default=0.1)
    parser.add_argument("--retrain-epochs", type=int, default=2, help="passes of each incremental retrain")
    parser.add_argument(
        "--forgetting-only", action="store_true", help="re-measure forgetting with the runs already in bench_data"
    )
    args = parser.parse_args()
    if args.forgetting_only:
        return update_forgetting(args)
    extra = ["--heads.item_loss=sampled", "--heads.num_negatives=256"] if args.dataset == "sports" else []
    work = REPO / "bench_data" / f"continual_{args.dataset}"
    users, items, times = read_events(args.dataset)
    spans = periods(times)
    files = [write_period(work / f"p{k}.csv", users[a:b], items[a:b], times[a:b]) for k, (a, b) in enumerate(spans)]
    data = work / "data"
    bgpt("shard", "--input", str(files[0]), "--out", str(data), "--overwrite")
    train = [*MODEL, *extra, "--train.lr=0.001", f"--epochs={args.epochs}", "--checkpoint.resume=none"]
    base = work / "run_base"
    bgpt("train", "--data", str(data), "--out", str(base), *train)
    tokens = lambda run: json.loads((run / "metrics.json").read_text())["train"]["tokens"]  # noqa: E731
    series, previous = [], base
    windows_by_period = {}
    for k in (1, 2, 3):
        bgpt("shard", "--append", "--input", str(files[k]), "--out", str(data))
        inc = work / f"run_inc{k}"
        bgpt(
            "retrain", "--run", str(previous), "--data", str(data), "--out", str(inc),
            "--replay-fraction", str(args.replay_fraction), "--epochs", str(args.retrain_epochs),
            "--train.lr=0.0005", "--train.warmup_steps=20", "--checkpoint.resume=none",
        )  # fmt: skip
        full = work / f"run_full{k}"
        bgpt("train", "--data", str(data), "--out", str(full), *train)
        a, b = spans[k + 1]
        windows = eval_windows(users, items, times, a, b, data, 50)
        windows_by_period[k + 1] = windows
        point = {
            "increment": k,
            "eval_period": k + 1,
            "eval_users": len(windows),
            "incremental": evaluate(inc, data, [w.copy() for w in windows]),
            "full": evaluate(full, data, [w.copy() for w in windows]),
            "stale": evaluate(base, data, [w.copy() for w in windows]),
            "incremental_tokens": tokens(inc),
            "full_tokens": tokens(full),
        }
        series.append(point)
        print(json.dumps(point), flush=True)
        previous = inc
    forgetting = measure_forgetting(work, data, users, items, times, spans, args.replay_fraction)
    last = series[-1]
    inc_tokens = sum(p["incremental_tokens"] for p in series)
    metrics = {
        "incremental_ndcg@10": last["incremental"]["ndcg@10"],
        "full_ndcg@10": last["full"]["ndcg@10"],
        "stale_ndcg@10": last["stale"]["ndcg@10"],
        "incremental_hr@10": last["incremental"]["hr@10"],
        "full_hr@10": last["full"]["hr@10"],
        "stale_hr@10": last["stale"]["hr@10"],
        "compute_ratio": round(last["incremental_tokens"] / last["full_tokens"], 4),
        "cumulative_compute_ratio": round(inc_tokens / sum(p["full_tokens"] for p in series), 4),
        "relative_gap_to_full": round(1 - last["incremental"]["ndcg@10"] / max(1e-9, last["full"]["ndcg@10"]), 4),
        "eval_users_last_period": last["eval_users"],
        "forgetting_relative_drop": forgetting["relative_drop"],
    }
    result = {
        "benchmark": "continual",
        "dataset": f"{args.dataset}: base period + 3 increments + last period, cut at event quantiles {CUTS}",
        "command": "python benchmarks/continual_bench.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "metrics": metrics,
        "goal": "(a) incremental within 2% relative NDCG@10 of (b) full retrain at <= 25% of its compute "
        "(tokens), and clearly above (c) stale",
        "series": series,
        "forgetting": forgetting,
        "settings": {
            "model": " ".join(MODEL + extra),
            "epochs_base_and_full": args.epochs,
            "retrain_epochs": args.retrain_epochs,
            "replay_fraction": args.replay_fraction,
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"continual_{args.dataset}"
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(series, RESULTS / f"{name}_curves.png", args.dataset)
    rows = [
        f"| {p['increment']} | {p['eval_users']} | {p['incremental']['ndcg@10']:.4f} | {p['full']['ndcg@10']:.4f} | "
        f"{p['stale']['ndcg@10']:.4f} | {p['incremental_tokens']:,} | {p['full_tokens']:,} |"
        for p in series
    ]
    (RESULTS / f"{name}.md").write_text(
        f"# Continual: {args.dataset}\n\n`{result['command']}` on {result['machine']}\n\n"
        "NDCG@10 on the period after each increment (first event of each returning user, full ranking).\n\n"
        "| increment | users | incremental | full retrain | stale | incremental targets | full targets |\n"
        "|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
        f"{forgetting_line(forgetting)}\n\n"
        f"![curves]({name}_curves.png)\n"
    )
    print(json.dumps(metrics, indent=2))


def update_forgetting(args: argparse.Namespace) -> None:
    work = REPO / "bench_data" / f"continual_{args.dataset}"
    name = f"continual_{args.dataset}"
    result = json.loads((RESULTS / f"{name}.json").read_text())
    users, items, times = read_events(args.dataset)
    forgetting = measure_forgetting(
        work, work / "data", users, items, times, periods(times), result["settings"]["replay_fraction"]
    )
    result.pop("forgetting_ndcg@10", None)
    result["forgetting"] = forgetting
    result["significance_last_period"] = measure_significance(work, work / "data", users, items, times, periods(times))
    result["metrics"]["forgetting_relative_drop"] = forgetting["relative_drop"]
    result["forgetting_command"] = "python benchmarks/continual_bench.py " + " ".join(sys.argv[1:])
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = (RESULTS / f"{name}.md").read_text().splitlines()
    # Replace the forgetting paragraph and the significance one after it (rerunning changes nothing).
    sig = significance_line(result["significance_last_period"])
    md = [line for line in md if not line.startswith("Paired bootstrap")]
    md = [f"{forgetting_line(forgetting)}\n\n{sig}" if line.startswith("Forgetting") else line for line in md]
    (RESULTS / f"{name}.md").write_text(re.sub(r"\n{3,}", "\n\n", "\n".join(md) + "\n"))
    print(forgetting_line(forgetting))
    print(significance_line(result["significance_last_period"]))


def plot(series: list[dict], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [p["increment"] for p in series]
    for key, label in (("incremental", "(a) incremental"), ("full", "(b) full retrain"), ("stale", "(c) stale")):
        ax.plot(x, [p[key]["ndcg@10"] for p in series], marker="o", label=label)
    ax.set_xlabel("increment")
    ax.set_xticks(x)
    ax.set_ylabel("NDCG@10 on the next period")
    ax.set_title(f"{dataset}: incremental vs full retrain vs stale", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
