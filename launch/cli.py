"""The `bgpt` command line: one subcommand per pipeline step."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data_sharding import storage
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


def _run_shard(args: argparse.Namespace) -> int:
    from data_sharding.ingest import InputConfig
    from data_sharding.inspect import format_summary, summary
    from data_sharding.pipeline import ShardConfig, build

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
        split=_split_config(args),
        items=args.items,
        items_format=args.items_format,
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
    if (root / "config.yaml").exists() and not (root / shards.MANIFEST).exists():
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
    from trainer.run import run_status

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


TRAIN_SHORTCUTS = {
    "backbone": ("model", "backbone"),
    "num_layers": ("model", "num_layers"),
    "max_len": ("model", "max_len"),
    "lora_r": ("lora", "r"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "full_finetune": ("lora", "full_finetune"),
    "max_steps": ("train", "max_steps"),
    "max_minutes": ("train", "max_minutes"),
    "epochs": ("train", "epochs"),
    "lr": ("train", "lr"),
    "batch_size": ("train", "micro_batch_size"),
    "seed": ("train", "seed"),
    "num_workers": ("data", "num_workers"),
    "resume": ("checkpoint", "resume"),
    "checkpoint_every": ("checkpoint", "every_steps"),
    "checkpoint_minutes": ("checkpoint", "every_minutes"),
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a next-behaviour model on shards",
        description="Train a model. Any config field can be set with --section.field=value "
        "(sections: data, model, lora, heads, train, checkpoint, eval); they override --config.",
    )
    p.add_argument("--data", required=True, metavar="DIR", help="dataset folder written by `bgpt shard`")
    p.add_argument("--out", required=True, metavar="RUN", help="run folder (resumed when it has checkpoints)")
    p.add_argument("--config", metavar="YAML", help="run configuration file")
    p.add_argument("--backbone", help="smollm2-135m (default), scratch, or a local Hugging Face model directory")
    p.add_argument("--num-layers", type=int, help="keep the first N blocks (pretrained) / build N (scratch)")
    p.add_argument("--max-len", type=int, help="history length the model reads")
    p.add_argument("--lora-r", type=int)
    p.add_argument("--lora-alpha", type=int)
    p.add_argument("--lora-dropout", type=float)
    p.add_argument("--full-finetune", action="store_const", const="true", help="train all backbone weights")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int, help="micro batch size per device")
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int, help="data loader workers per process")
    p.add_argument(
        "--resume", help="auto (latest valid checkpoint of --out; the default), none, or a checkpoint folder"
    )
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="checkpoint every N optimizer steps")
    p.add_argument("--checkpoint-minutes", type=float, metavar="MIN", help="checkpoint every M minutes")
    p.set_defaults(func=_run_train, accepts_overrides=True)


def _train_config(args: argparse.Namespace):
    from launch.configs import load_config, merge, parse_overrides

    overrides = parse_overrides(args.overrides)
    shortcuts: dict[str, dict] = {"data": {"path": args.data}}
    for flag, (section, key) in TRAIN_SHORTCUTS.items():
        value = getattr(args, flag)
        if value is not None:
            shortcuts.setdefault(section, {})[key] = value
    return load_config(args.config, merge(shortcuts, overrides))


def _run_train(args: argparse.Namespace) -> int:
    from trainer.run import train_run

    cfg = _train_config(args)
    metrics = train_run(Path(args.out), cfg)
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if k != "train"}))
    return _train_status(metrics)


def _train_status(metrics: dict) -> int:
    """0 when the run finished; EXIT_STOPPED when it stopped with a checkpoint (a rank under
    `bgpt launch` exits 0 then, and the launcher reports the stop, so no launcher reads it as a crash)."""
    from launch.distributed import LAUNCHED_ENV
    from trainer.loop import EXIT_STOPPED

    stopped = metrics is not None and "stopped_at_step" in metrics
    return EXIT_STOPPED if stopped and not os.environ.get(LAUNCHED_ENV) else 0


def _add_retrain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="continue a run on the next data generation (new events + replay, grown item tables)",
        description="Incremental retraining from RUN's latest checkpoint on DIR's newest generation, into a "
        "new run folder. Config fields can be overridden with --section.field=value.",
    )
    p.add_argument("--run", required=True, metavar="RUN", help="the run to continue (left unchanged)")
    p.add_argument(
        "--data", required=True, metavar="DIR", help="the dataset with the new generation (bgpt shard --append)"
    )
    p.add_argument("--out", required=True, metavar="NEW", help="the new run folder (resumed when it has checkpoints)")
    p.add_argument("--replay-fraction", type=float, help="share of users whose whole history trains again (0.1)")
    p.add_argument("--epochs", type=int, help="passes over the new events (default 1)")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-minutes", type=float)
    p.add_argument("--lr", type=float)
    p.set_defaults(func=_run_retrain, accepts_overrides=True)


def _run_retrain(args: argparse.Namespace) -> int:
    from launch.configs import merge, parse_overrides
    from trainer.retrain import retrain

    shortcuts: dict[str, dict] = {}
    for flag, (section, key) in {
        "replay_fraction": ("data", "replay_fraction"),
        "epochs": ("train", "epochs"),
        "max_steps": ("train", "max_steps"),
        "max_minutes": ("train", "max_minutes"),
        "lr": ("train", "lr"),
    }.items():
        if getattr(args, flag) is not None:
            shortcuts.setdefault(section, {})[key] = getattr(args, flag)
    metrics = retrain(
        Path(args.run), Path(args.data), Path(args.out), merge(shortcuts, parse_overrides(args.overrides))
    )
    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if k != "train"}))
    return _train_status(metrics)


def _add_predict(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from trainer.export import load_inference
    from trainer.periods import parse_time
    from trainer.predict import histories_from_data, histories_from_events, predict, write_predictions

    if args.k < 1:
        raise BgptError("--k must be >= 1")
    run = Path(args.run)
    model = load_inference(run, args.quantize)
    users = [u.strip() for u in args.users.split(",") if u.strip()] if args.users else None
    if args.events:
        histories = histories_from_events(Path(args.events), model, args.format)
        if users is not None:
            histories = (h for h in histories if h.user in set(users))
    else:
        data = args.data
        if data is None:
            if not (run / "config.yaml").exists():
                raise BgptError(f"{run} is an export: pass --data DIR or --events FILE")
            from trainer.run import load_run_config

            data = load_run_config(run).data.path
        histories = histories_from_data(storage.as_root(data), model, users)
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


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a self-contained model directory for serving and plain transformers")
    p.add_argument("--run", required=True, metavar="RUN")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the backbone weights")
    p.add_argument("--quantize", choices=("int8",), help="serve with dynamic int8 quantization")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export (atomically)")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from trainer.export import export_run

    meta = export_run(Path(args.run), Path(args.out), args.merge_lora, args.quantize, args.overwrite)
    print(json.dumps({"out": args.out, **{k: meta[k] for k in ("version", "merged_lora", "quantize")}}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bgpt", description="behavior-gpt: next-behaviour prediction with LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    from launch import cluster_cli, eval_cli, serve_cli

    for add in (
        _add_synth,
        _add_shard,
        _add_inspect,
        _add_train,
        _add_retrain,
        eval_cli.add_eval,
        eval_cli.add_baseline,
        _add_predict,
        _add_export,
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
