"""The `bgpt` command line: one subcommand per pipeline step."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_sharding.errors import BgptError


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate a synthetic behaviour log (and item titles)")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--users", type=int, default=5_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-unit", choices=("s", "ms"), default="s")
    p.add_argument("--out", required=True, help="events file: .csv, .tsv, .parquet or .jsonl")
    p.add_argument("--items-out", help="item titles file (default: items.<ext> beside --out)")
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from data_sharding.synth import SynthConfig, generate

    out = Path(args.out)
    items_out = Path(args.items_out) if args.items_out else out.with_name("items" + out.suffix)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cfg = SynthConfig(
            events=args.events, users=args.users, items=args.items, seed=args.seed, time_unit=args.time_unit
        )
    except ValueError as e:
        raise BgptError(str(e)) from None
    n = generate(cfg, out, items_out)
    print(f"wrote {n:,} events to {out} and {cfg.items:,} item titles to {items_out}")
    return 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="validate raw events and write webdataset shards + manifest")
    p.add_argument("--input", nargs="+", required=True, metavar="PATH")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--format", default="auto", help="auto|csv|tsv|parquet|jsonl|movielens")
    p.add_argument("--items", metavar="ITEMS_FILE", help="item metadata: id, title/text, attributes")
    p.add_argument("--items-format", default="auto")
    for role in ("user", "item", "time", "type", "value"):
        p.add_argument(f"--{role}-col", metavar="NAME")
    p.add_argument("--time-unit", default="auto", help="numeric timestamps: auto|s|ms")
    p.add_argument("--min-time", default="1970-01-02", help="earliest valid timestamp (ISO 8601)")
    p.add_argument("--max-time", default="2100-01-01", help="latest valid timestamp (ISO 8601)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--min-item-count", type=int, default=1)
    p.add_argument("--events-per-shard", type=int, default=2_000_000)
    p.add_argument("--split", default="loo", help="loo (leave-one-out) or time")
    p.add_argument("--valid-start", help="with --split time: start of the validation period (ISO 8601)")
    p.add_argument("--test-start", help="with --split time: start of the test period (ISO 8601)")
    p.add_argument("--append", action="store_true", help="add a new generation to the dataset in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in --out")
    p.add_argument("--memory-limit", default="3GB", help="DuckDB memory limit; it spills to disk beyond it")
    p.add_argument("--threads", type=int)
    p.add_argument("--temp-dir", help="where DuckDB spills (default: inside --out)")
    p.set_defaults(func=_run_shard)


def _run_shard(args: argparse.Namespace) -> int:
    from data_sharding.ingest import InputConfig
    from data_sharding.inspect import format_summary, summary
    from data_sharding.pipeline import ShardConfig, build
    from data_sharding.sequences import SplitConfig

    cfg = ShardConfig(
        out=args.out,
        input=InputConfig(
            paths=args.input,
            format=args.format,
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=args.time_col,
            type_col=args.type_col,
            value_col=args.value_col,
            time_unit=args.time_unit,
            min_time=args.min_time,
            max_time=args.max_time,
        ),
        split=SplitConfig(args.split, args.valid_start, args.test_start),
        items=args.items,
        items_format=args.items_format,
        append=args.append,
        overwrite=args.overwrite,
        events_per_shard=args.events_per_shard,
        min_item_count=args.min_item_count,
        max_bad_fraction=args.max_bad_fraction,
        memory_limit=args.memory_limit,
        threads=args.threads,
        temp_dir=args.temp_dir,
    )
    manifest = build(cfg)
    gen = manifest["generations"][-1]
    print(format_summary(summary(Path(args.out))))
    print(f"\ngeneration {gen['generation']} written in {gen['seconds']:.1f} s")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="summarise a dataset; --verify re-hashes every shard")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--verify", action="store_true", help="re-hash all shards; exit 1 naming any bad one")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from data_sharding import shards
    from data_sharding.inspect import format_summary, summary

    root = Path(args.dir)
    info = summary(root)
    print(json.dumps(info, indent=2) if args.json else format_summary(info))
    if args.verify:
        problems = shards.verify_dataset(root, shards.load_manifest(root))
        for line in problems:
            print(f"bgpt: corrupt: {line}", file=sys.stderr)
        if problems:
            return 1
        n = sum(g["shards"] for g in info["generations"])
        print(f"\nverified {n} shards and their indexes: all checksums match")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgpt", description="behavior-gpt: next-behaviour prediction with LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_synth, _add_shard, _add_inspect):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BgptError as e:
        print(f"bgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bgpt: interrupted; the previous manifest is untouched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
