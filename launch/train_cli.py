"""`bgpt train` and `bgpt retrain`: their arguments, parsed into a RunConfig, and the exit status
of a training request. `bgpt launch` and `bgpt slurm` parse their training arguments here too."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from launch.distributed import LAUNCHED_ENV
from trainer.errors import ConfigError

if TYPE_CHECKING:  # trainer modules load torch: imported where used, so `bgpt --help` stays fast
    from trainer.config import RunConfig

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
RETRAIN_SHORTCUTS = {
    "replay_fraction": ("data", "replay_fraction"),
    "epochs": ("train", "epochs"),
    "max_steps": ("train", "max_steps"),
    "max_minutes": ("train", "max_minutes"),
    "lr": ("train", "lr"),
}


def _shortcuts(args: argparse.Namespace, table: dict, sections: dict[str, dict]) -> dict[str, dict]:
    """``sections`` plus the config values of the shortcut flags given on the command line."""
    for flag, (section, key) in table.items():
        value = getattr(args, flag)
        if value is not None:
            sections.setdefault(section, {})[key] = value
    return sections


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a next-behaviour model on shards",
        description="Train a model. Any config field can be set with --section.field=value "
        "(sections: data, model, lora, heads, train, checkpoint, eval); they override --config.",
    )
    _train_arguments(p)
    p.set_defaults(func=run_train, accepts_overrides=True)


def _train_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--num-workers", type=int, help="data loader workers per process (default: from the cores per process)"
    )
    p.add_argument(
        "--resume", help="auto (latest valid checkpoint of --out; the default), none, or a checkpoint folder"
    )
    p.add_argument("--checkpoint-every", type=int, metavar="STEPS", help="checkpoint every N optimizer steps")
    p.add_argument("--checkpoint-minutes", type=float, metavar="MIN", help="checkpoint every M minutes")


def config_from_train_args(train_args: list[str]) -> tuple[RunConfig, Path]:
    """The RunConfig `bgpt train` would build from these arguments, and its run folder (for
    `bgpt launch` / `bgpt slurm`, whose training arguments follow --)."""
    if not train_args:
        raise ConfigError("give the training arguments after --, e.g. -- --data DIR --out RUN")
    parser = argparse.ArgumentParser(prog="bgpt train")
    _train_arguments(parser)
    args, rest = parser.parse_known_args(train_args)
    args.overrides = rest
    return train_config(args), Path(args.out)


def train_config(args: argparse.Namespace) -> RunConfig:
    from trainer.config import load_config, merge, parse_overrides

    shortcuts = _shortcuts(args, TRAIN_SHORTCUTS, {"data": {"path": args.data}})
    return load_config(args.config, merge(shortcuts, parse_overrides(args.overrides)))


def run_train(args: argparse.Namespace) -> int:
    from trainer.run import train_run

    return _report(train_run(Path(args.out), train_config(args)))


def _report(metrics: dict) -> int:
    """Print the request's metrics (its train state left out); the exit status: 0 when the run
    finished, EXIT_STOPPED when it stopped with a checkpoint (a rank under `bgpt launch` exits 0
    then, and the launcher reports the stop, so no launcher reads it as a crash)."""
    from trainer.run_folder import EXIT_STOPPED

    if metrics:
        print(json.dumps({k: v for k, v in metrics.items() if k != "train"}))
    stopped = metrics is not None and "stopped_at_step" in metrics
    return EXIT_STOPPED if stopped and not os.environ.get(LAUNCHED_ENV) else 0


def add_retrain(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(func=run_retrain, accepts_overrides=True)


def run_retrain(args: argparse.Namespace) -> int:
    from trainer.config import merge, parse_overrides
    from trainer.retrain import retrain

    overrides = merge(_shortcuts(args, RETRAIN_SHORTCUTS, {}), parse_overrides(args.overrides))
    return _report(retrain(Path(args.run), Path(args.data), Path(args.out), overrides))
