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
    p.add_argument("--out", required=True, help="events file: .csv, .tsv, .parquet or .jsonl (a folder with --parts)")
    p.add_argument(
        "--parts", type=int, default=1, help="write a folder of this many Parquet part files (streamed, bounded memory)"
    )
    p.add_argument(
        "--items-out", help="item titles file (default: items.<ext> beside --out; items.parquet with --parts)"
    )
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from data_sharding.synth import SynthConfig, generate

    out = Path(args.out)
    if args.parts < 1:
        raise BgptError("--parts must be >= 1")
    if args.parts > 1 and out.exists() and any(out.iterdir()):
        raise BgptError(f"{out} is not empty: --parts writes a new folder of part files")
    default_items = out.parent / "items.parquet" if args.parts > 1 else out.with_name("items" + out.suffix)
    items_out = Path(args.items_out) if args.items_out else default_items
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        cfg = SynthConfig(
            events=args.events, users=args.users, items=args.items, seed=args.seed, time_unit=args.time_unit
        )
    except ValueError as e:
        raise BgptError(str(e)) from None
    n = generate(cfg, out, items_out, parts=args.parts)
    print(f"wrote {n:,} events to {out} and {cfg.items:,} item titles to {items_out}")
    return 0


def _add_shard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("shard", help="validate raw events and write webdataset shards + manifest")
    p.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="event files, folders (a datasets.save_to_disk folder or a Hub-style Parquet layout: every data "
        "file in it) or glob patterns; local paths or fsspec URLs",
    )
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--format", default="auto", help="auto|csv|tsv|parquet|jsonl|movielens|arrow")
    for role in ("user", "item", "time", "type", "value"):
        p.add_argument(f"--{role}-col", metavar="NAME")
    _add_layout_flags(p, "", "event files")
    _add_items_flags(p)
    p.add_argument("--time-unit", default="auto", help="numeric timestamps: auto|s|ms")
    p.add_argument("--min-time", default="1970-01-02", help="earliest valid timestamp (ISO 8601)")
    p.add_argument("--max-time", default="2100-01-01", help="latest valid timestamp (ISO 8601)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01)
    p.add_argument("--min-item-count", type=int, default=1)
    p.add_argument("--events-per-shard", type=int, default=2_000_000)
    p.add_argument(
        "--shard-multiple",
        type=int,
        default=1,
        help="make the shard count a multiple of this: training ranks x loader workers, so every reader "
        "streams whole shards (e.g. 16 for 8 GPUs x 2 workers)",
    )
    p.add_argument(
        "--split",
        help="loo (leave-one-out; the default), time (--valid-start/--test-start) or none (every event trains: "
        "continual data evaluated on its next generation); --append keeps the dataset's",
    )
    p.add_argument("--valid-start", help="with --split time: start of the validation period (ISO 8601)")
    p.add_argument("--test-start", help="with --split time: start of the test period (ISO 8601)")
    p.add_argument("--append", action="store_true", help="add a new generation to the dataset in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the dataset in --out")
    p.add_argument("--memory-limit", default="3GB", help="DuckDB memory limit; it spills to disk beyond it")
    p.add_argument("--threads", type=int)
    p.add_argument("--temp-dir", help="where DuckDB (and local Spark) spill (default: inside --out)")
    p.add_argument(
        "--engine",
        default="duckdb",
        choices=("duckdb", "spark"),
        help="duckdb: one machine; spark: the event-sized stages as Spark jobs (same output)",
    )
    p.add_argument("--master", help="Spark master URL with --engine spark (default local[*]; spark-submit sets it)")
    p.add_argument(
        "--spark-conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Spark setting with --engine spark, e.g. spark.executor.memory=8g (repeatable)",
    )
    p.set_defaults(func=_run_shard)


def _key_values(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BgptError(f"{flag} {pair!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _split_config(args: argparse.Namespace):
    """--split as given (None: leave-one-out, or the dataset's own on --append)."""
    from data_sharding.sequences import SplitConfig

    if args.split is None and not (args.valid_start or args.test_start):
        return None
    return SplitConfig(args.split or "loo", args.valid_start, args.test_start)


def _add_items_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--items", metavar="ITEMS_FILE", help="item metadata: id, title/text, attributes")
    p.add_argument("--items-format", default="auto")
    p.add_argument("--items-id-col", metavar="NAME", help="item id column of the items file (default: guessed)")
    p.add_argument("--items-title-col", metavar="NAME", help="title/text column (default: title, name, text...)")
    p.add_argument("--items-attribute-cols", metavar="A,B", help="columns that become attributes (default: all others)")
    _add_layout_flags(p, "items-", "the items file")


def _add_layout_flags(p: argparse.ArgumentParser, prefix: str, what: str) -> None:
    p.add_argument(f"--{prefix}columns", metavar="A,B,C", help=f"column names of {what} without a header row, in order")
    p.add_argument(f"--{prefix}delimiter", metavar="CHAR", help=f"field separator of {what} (csv: ',', tsv: tab)")
    p.add_argument(f"--{prefix}encoding", default="utf-8", help=f"{what}: utf-8, latin-1 or utf-16")


def _delimiter(text: str | None) -> str | None:
    """A separator as typed on a command line: ``\\t`` or ``tab`` mean a tab."""
    return "\t" if text in ("\\t", "tab") else text


def _names(text: str | None) -> list[str] | None:
    return None if text is None else [name.strip() for name in text.split(",")]


def _run_shard(args: argparse.Namespace) -> int:
    from data_sharding.ingest import InputConfig
    from data_sharding.inspect import format_summary, summary
    from data_sharding.items_file import ItemsConfig
    from data_sharding.pipeline import ShardConfig, build

    cfg = ShardConfig(
        out=args.out,
        input=InputConfig(
            paths=args.input,
            format=args.format,
            columns=_names(args.columns),
            delimiter=_delimiter(args.delimiter),
            encoding=args.encoding,
            user_col=args.user_col,
            item_col=args.item_col,
            time_col=args.time_col,
            type_col=args.type_col,
            value_col=args.value_col,
            time_unit=args.time_unit,
            min_time=args.min_time,
            max_time=args.max_time,
        ),
        split=_split_config(args),
        items=args.items,
        items_options=ItemsConfig(
            format=args.items_format,
            id_col=args.items_id_col,
            title_col=args.items_title_col,
            attribute_cols=_names(args.items_attribute_cols),
            columns=_names(args.items_columns),
            delimiter=_delimiter(args.items_delimiter),
            encoding=args.items_encoding,
        ),
        append=args.append,
        overwrite=args.overwrite,
        events_per_shard=args.events_per_shard,
        shard_multiple=args.shard_multiple,
        min_item_count=args.min_item_count,
        max_bad_fraction=args.max_bad_fraction,
        memory_limit=args.memory_limit,
        threads=args.threads,
        temp_dir=args.temp_dir,
        engine=args.engine,
        master=args.master,
        spark_conf=_key_values(args.spark_conf, "--spark-conf"),
    )
    manifest = build(cfg)
    gen = manifest["generations"][-1]
    print(format_summary(summary(Path(args.out))))
    print(f"\ngeneration {gen['generation']} written in {gen['seconds']:.1f} s")
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="summarise a dataset (--verify re-hashes every shard) or say what a run folder holds",
    )
    p.add_argument("dir", metavar="DIR|RUN")
    p.add_argument("--verify", action="store_true", help="re-hash all shards; exit 1 naming any bad one")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from data_sharding import shards
    from data_sharding.inspect import format_summary, summary

    root = Path(args.dir)
    if not (root / shards.MANIFEST).exists():
        from trainer.config import CONFIG

        if (root / CONFIG).exists():
            return _inspect_run(root, args.json)
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


def _inspect_run(run: Path, as_json: bool) -> int:
    from trainer.run_folder import run_status

    st = run_status(run)
    if as_json:
        print(json.dumps(st, indent=2))
        return 0
    requested = st["requested_steps"] or f"{st['epochs']} epochs"
    state = "finished (metrics.json)" if st["finished"] else "not finished"
    if st["stopped"]:
        state += f"; stopped on request at step {st['stopped']['step']} (attempt {st['stopped']['attempt'] or '-'})"
    lines = [
        f"{run}: {state}",
        f"  steps logged: {st['last_logged_step']} of {requested}",
        f"  latest valid checkpoint: {st['latest_checkpoint'] or 'none'}"
        + (f" (step {st['latest_checkpoint_step']})" if st["latest_checkpoint"] else ""),
        *(f"  {line} (on resume too)" for line in st["invalid_newer_checkpoints"]),
        f"  best validated weights: {'step ' + str(st['best_step']) if st['best_step'] is not None else 'none'}",
    ]
    if st["stop_requested"]:
        lines.append(f"  stop requested (RUN/STOP) for: {st['stop_requested']}")
    print("\n".join(lines))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgpt", description="behavior-gpt: next-behaviour prediction with LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    from launch import cluster_cli, eval_cli, predict_cli, serve_cli, train_cli

    for add in (
        _add_synth,
        _add_shard,
        _add_inspect,
        train_cli.add_train,
        train_cli.add_retrain,
        eval_cli.add_eval,
        eval_cli.add_baseline,
        predict_cli.add_predict,
        predict_cli.add_export,
    ):
        add(sub)
    for add in (cluster_cli.add_launch, cluster_cli.add_plan, cluster_cli.add_slurm, serve_cli.add_serve):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bgpt launch|slurm [options] -- <train arguments>`: the part after -- is for `bgpt train`.
    train_args: list[str] = []
    if argv and argv[0] in ("launch", "slurm") and "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1 :]
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = rest
    args.train_args = train_args
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
