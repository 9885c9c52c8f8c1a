"""Incremental retraining: continue a run on the next generation of its data.

``bgpt retrain --run RUN --data DIR --out NEW`` loads RUN's latest valid checkpoint, grows the item
(and event-type, attribute) tables for the ids the new generation added - old rows unchanged bit
for bit, new item rows from the item's text when the model reads text, else the mean of the known
items - and trains a new run on the new events only, each with its preceding history as context,
plus a replay sample of users whose whole history trains again. The optimizer and learning-rate
schedule start fresh (a warm restart). NEW records its lineage and checkpoints/resumes like any run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from data_sharding import shards
from trainer import checkpoint as ckpt
from trainer.config import CONFIG, RunConfig, load_config, merge
from trainer.errors import ConfigError
from trainer.run import train_run

LINEAGE = "lineage.json"


def vocab_generation(version: str) -> int:
    match = re.match(r"g(\d+)-", version or "")
    if not match:
        raise ConfigError(f"vocab version {version!r} does not name a generation")
    return int(match.group(1))


def retrain_config(parent: Path, data: Path, overrides: dict[str, dict], log=print) -> tuple[RunConfig, dict]:
    """The RunConfig of a retrain of ``parent`` on ``data``, and its lineage record."""
    if not (parent / CONFIG).exists():
        raise ConfigError(f"{parent}: not a run folder (no {CONFIG}); give the folder `bgpt train --out` wrote")
    source = ckpt.latest_valid(parent, log)
    if source is None:
        raise ConfigError(f"{parent}: no valid checkpoint to retrain from")
    state = ckpt.read_state(source)
    manifest = shards.load_manifest(data)  # schema version checked here
    parent_gen = vocab_generation(state["vocab_version"])
    generation = int(manifest["generation"])
    if generation == parent_gen:
        raise ConfigError(
            f"{data} is at generation {generation}, the one {parent} was trained on: nothing new to learn "
            f"(add data with `bgpt shard --append`; to train longer, rerun `bgpt train`)"
        )
    if generation < parent_gen:
        raise ConfigError(f"{data} is at generation {generation}, older than {parent}'s generation {parent_gen}")
    if generation > parent_gen + 1:
        raise ConfigError(
            f"{data} is at generation {generation} but {parent} was trained on generation {parent_gen}: "
            f"retrain on generation {parent_gen + 1} first (one generation at a time), or train from scratch"
        )
    base = {
        "data": {"path": str(data), "focus_new": True},
        "train": {"init_from": str(source.resolve()), "max_minutes": None, "max_steps": None, "epochs": 1},
        "checkpoint": {"resume": "auto"},
    }
    cfg = load_config(parent / CONFIG, merge(base, overrides))
    parent_lineage = parent / LINEAGE
    lineage = {
        "parent_run": str(parent.resolve()),
        "parent_checkpoint": source.name,
        "parent_step": state["step"],
        "parent_vocab_version": state["vocab_version"],
        "vocab_version": manifest["vocab"]["version"],
        "data": str(Path(data).resolve()),
        "generation": generation,
        "replay_fraction": cfg.data.replay_fraction,
        "ancestors": json.loads(parent_lineage.read_text())["chain"] if parent_lineage.exists() else [],
    }
    lineage["chain"] = [*lineage["ancestors"], {"run": str(parent.resolve()), "generation": parent_gen}]
    return cfg, lineage


def retrain(parent: Path, data: Path, out: Path, overrides: dict[str, dict], log=print) -> dict:
    if out.resolve() == parent.resolve():
        raise ConfigError("--out must be a new run folder: the parent run stays as it was")
    cfg, lineage = retrain_config(parent, data, overrides, log)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / LINEAGE).exists():
        (out / LINEAGE).write_text(json.dumps(lineage, indent=2) + "\n")
    elif json.loads((out / LINEAGE).read_text())["parent_run"] != lineage["parent_run"]:
        raise ConfigError(f"{out} is the retrain of another run; choose a new --out")
    return train_run(out, cfg, log=log)
