"""`bgpt eval` and `bgpt baseline`: full-ranking metrics of runs and count baselines.

Two protocols, one metric code path (trainer.evaluate.rank_batches):
- ``split`` (default): the dataset's stored valid/test events (leave-one-out or ``--split time``);
- ``next-period``: every event of a period (the newest generation, ``--generation N``,
  ``--from T [--to T]``, or ``--split``) predicted from everything before it
  (trainer.next_period), with breakdowns by user, item and position in the period.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_sharding.errors import BgptError

BASELINE_KINDS = (  # trainer.baselines.KINDS
    "popularity",
    "recent-popularity",
    "recent-popularity-online",
    "transition",
    "transition-online",
)
PROTOCOLS = ("split", "next-period")


def _ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise BgptError(f"--k {text!r}: expected comma-separated integers") from None
    if not ks or min(ks) < 1:
        raise BgptError("--k needs positive integers")
    return ks


def _exclude_seen(value: str | None) -> bool | str | None:
    if value is None or value == "auto":
        return value
    if value in ("true", "false"):
        return value == "true"
    raise BgptError(f"--exclude-seen {value!r}: choose true, false or auto")


def _add_period_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="split",
        help="split: the stored valid/test events; next-period: every event of a period from everything before it",
    )
    p.add_argument("--split", choices=("valid", "test"), help="held-out split to score (split protocol: test)")
    p.add_argument("--generation", type=int, help="next-period: this generation's new events (default: the newest)")
    p.add_argument("--from", dest="start", metavar="TIME", help="next-period: events from TIME (ISO 8601 or unix)")
    p.add_argument("--to", dest="end", metavar="TIME", help="next-period: ... until before TIME (default: the end)")
    p.add_argument("--k", default="10,20", help="cut-offs, comma separated")
    p.add_argument(
        "--exclude-seen",
        nargs="?",
        const="true",
        metavar="true|false|auto",
        help="never rank items already in the user's history (default: the run's eval.exclude_seen; auto for "
        "baselines: on unless >= 5%% of training events repeat a history item)",
    )
    p.add_argument("--no-exclude-seen", dest="exclude_seen", action="store_const", const="false")
    p.add_argument("--out", metavar="FILE.json", help="also write the result here")


def _period_args(args: argparse.Namespace) -> dict:
    if args.protocol == "split" and (args.generation or args.start or args.end):
        raise BgptError("--generation/--from/--to need --protocol next-period")
    return {"generation": args.generation, "start": args.start, "end": args.end, "split": args.split}


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="full-ranking metrics of a trained run (or an ensemble of runs)",
        description="Score runs by full ranking over the catalogue: on the stored valid/test split, or "
        "(--protocol next-period) on every event of a period, trained on everything before it.",
    )
    p.add_argument(
        "--run",
        required=True,
        nargs="+",
        metavar="RUN",
        help="a run folder; several runs on the same data are scored as one ensemble",
    )
    p.add_argument("--data", metavar="DIR", help="next-period: the dataset holding the period (default: the run's)")
    p.add_argument(
        "--baselines",
        help="next-period: also score these count baselines on the same events (comma separated, or all)",
    )
    p.add_argument(
        "--cold-items",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="next-period: rank items the run never saw from their text/attributes when it reads them",
    )
    p.add_argument(
        "--online-counts",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="next-period: the runs' count priors also count the period's events before each query "
        "(default: the run's eval.online_counts, on)",
    )
    _add_period_options(p)
    p.set_defaults(func=run_eval)


def _baseline_list(text: str | None) -> list[str]:
    if not text:
        return []
    kinds = list(BASELINE_KINDS) if text == "all" else [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in BASELINE_KINDS]
    if unknown:
        raise BgptError(f"--baselines {', '.join(unknown)}: choose from {', '.join(BASELINE_KINDS)} or all")
    return kinds


def _log(*args) -> None:
    """Progress and decisions go to stderr: stdout is the result (its last line JSON), for `> file`."""
    print(*args, file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    runs = [Path(r) for r in args.run]
    exclude_seen = _exclude_seen(args.exclude_seen)
    if args.protocol == "next-period":
        from trainer.run import evaluate_on_period

        result = evaluate_on_period(
            runs,
            args.data,
            **_period_args(args),
            ks=_ks(args.k),
            exclude_seen=exclude_seen,
            baseline_kinds=_baseline_list(args.baselines),
            cold_items=args.cold_items,
            online_counts=args.online_counts,
            log=_log,
        )
        return _report_period(result, args.out)
    from trainer.run import evaluate_run

    period = _period_args(args)
    if args.data or args.baselines:
        raise BgptError("--data and --baselines need --protocol next-period")
    metrics = evaluate_run(runs, period["split"] or "test", _ks(args.k), exclude_seen, save=True, log=_log)
    _write(metrics, args.out)
    print(json.dumps(metrics))
    return 0


def add_baseline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "baseline",
        help="score count baselines with the evaluation protocol (popularity, recent-popularity, transition)",
        description="Count baselines fit on the events before what they predict and scored exactly like the "
        "models. recent-popularity's window and transition's steps/decay are chosen on the previous period "
        "(the previous generation, the range before --from, or the valid split before test).",
    )
    p.add_argument("kind", nargs="+", choices=BASELINE_KINDS)
    p.add_argument("--data", required=True, metavar="DIR")
    _add_period_options(p)
    p.set_defaults(func=run_baseline)


def run_baseline(args: argparse.Namespace) -> int:
    from trainer.run import evaluate_on_period

    period = _period_args(args)
    if args.protocol == "split":
        period["split"] = period["split"] or "test"
    exclude_seen = _exclude_seen(args.exclude_seen)
    result = evaluate_on_period(
        [], args.data, **period, ks=_ks(args.k), exclude_seen="auto" if exclude_seen is None else exclude_seen,
        baseline_kinds=list(dict.fromkeys(args.kind)), log=_log,
    )  # fmt: skip
    if len(args.kind) == 1:  # one baseline: its metrics at the top level, as `bgpt eval` prints a run's
        (kind,) = args.kind
        scores = result["scorers"][kind]
        flat = {"baseline": kind, "split": period["split"], "period": result["summary"]["period"]["label"]}
        flat.update(exclude_seen=result["exclude_seen"], **scores["overall"], breakdown=scores["breakdown"])
        flat["params"] = result["baselines"][kind]
        _write(flat, args.out)
        print(json.dumps(flat))
        return 0
    return _report_period(result, args.out)


def _write(result: dict, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")


def format_period(result: dict, k: int = 10) -> str:
    """A table: one row per scorer, NDCG@k overall and per breakdown group (events in brackets)."""
    summary = result["summary"]
    groups = list(dict.fromkeys(g for s in result["scorers"].values() for g in s["breakdown"]))
    lines = [
        f"{summary['period']['label']}: {summary['scored']:,} events scored of {summary['events']:,} "
        f"({summary['without_context']:,} without history), {summary['users']:,} users "
        f"({summary['new_users']:,} new), {summary['cold_events']:,} cold-item events, repeat share "
        f"{summary['repeat_share']:.1%}; history items excluded: {str(result['exclude_seen']).lower()}",
        "",
        f"NDCG@{k}".ljust(20) + "overall".rjust(10) + "".join(g.rjust(18) for g in groups),
    ]
    for name, scores in result["scorers"].items():
        cells = [f"{scores['overall'][f'ndcg@{k}']:.4f}".rjust(10)]
        for g in groups:
            m = scores["breakdown"].get(g)
            cells.append((f"{m[f'ndcg@{k}']:.4f} ({m['count']:,})" if m else "-").rjust(18))
        lines.append(name.ljust(20) + "".join(cells))
    for name, choice in result["baselines"].items():
        where = f"chosen on {choice['chosen_on']}" if choice["chosen_on"] else "defaults (no earlier period)"
        lines.append(f"{name}: {json.dumps(choice['params'])} ({where})")
    return "\n".join(lines)


def _report_period(result: dict, out: str | None) -> int:
    _write(result, out)
    k = 10 if any("ndcg@10" in s["overall"] for s in result["scorers"].values()) else None
    k = k or min(int(key.split("@")[1]) for key in next(iter(result["scorers"].values()))["overall"] if "ndcg@" in key)
    print(format_period(result, k))
    print(json.dumps(result))
    return 0
