"""`bgpt predict` and `bgpt export`: their arguments, and the printed form of predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data_sharding.errors import BgptError


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="top-K next items per user (Parquet with --out, or printed for --users)",
        description="Top-K next items (and next event type / time / value when those heads exist) from each "
        "user's latest events: all users of --data (default: the run's own data), the named --users, or the "
        "histories in a raw --events file.",
    )
    p.add_argument("--run", "--model", dest="run", required=True, metavar="RUN", help="a run folder or an export")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--data", metavar="DIR", help="sharded dataset (default: the run's own)")
    source.add_argument("--events", metavar="FILE", help="raw events file (csv, tsv, parquet, jsonl, movielens)")
    p.add_argument("--format", default="auto", help="format of --events (default: by extension)")
    p.add_argument("--users", help="only these user ids, comma separated (printed with titles without --out)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--exclude-seen", action="store_true", help="never recommend items in the history")
    p.add_argument("--out", metavar="FILE.parquet", help="write predictions here")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--quantize", choices=("int8",), help="dynamic int8 quantization of the backbone")
    p.add_argument(
        "--at", metavar="TIME", help="when the predicted events happen, for models that score at a time (default: now)"
    )
    p.set_defaults(func=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    from trainer.export import load_inference
    from trainer.periods import parse_time
    from trainer.predict import predict, select_histories, write_predictions

    if args.k < 1:
        raise BgptError("--k must be >= 1")
    model = load_inference(Path(args.run), args.quantize)
    users = [u.strip() for u in args.users.split(",") if u.strip()] if args.users else None
    events = Path(args.events) if args.events else None
    histories = select_histories(model, Path(args.run), args.data, events, args.format, users)
    at_ms = parse_time(args.at, "--at")
    if args.out:
        stats = write_predictions(
            model, histories, Path(args.out), args.k, args.exclude_seen, args.batch_size, at_ms=at_ms
        )
        print(json.dumps({"out": args.out, **stats}))
        return 0
    if users is None:
        raise BgptError("pass --out FILE.parquet (every user) or --users to print a few")
    histories = list(histories)
    for h, record in zip(histories, predict(model, histories, args.k, args.exclude_seen, at_ms), strict=True):
        last = [model.titles[i] or model.items[i] for i in h.items[-3:]]
        print(f"{h.user}  (recently: {' | '.join(last)})")
        for rank, (item, score) in enumerate(zip(record["items"], record["scores"], strict=True), 1):
            title = model.titles[model.item_index[item]] or ""
            print(f"  {rank:>2}. {item:<12} {score:8.3f}  {title}")
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a self-contained model directory for serving and plain transformers")
    p.add_argument("--run", required=True, metavar="RUN")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the backbone weights")
    p.add_argument("--quantize", choices=("int8",), help="serve with dynamic int8 quantization")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export (atomically)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from trainer.export import export_run

    meta = export_run(Path(args.run), Path(args.out), args.merge_lora, args.quantize, args.overwrite)
    print(json.dumps({"out": args.out, **{k: meta[k] for k in ("version", "merged_lora", "quantize")}}))
    return 0
