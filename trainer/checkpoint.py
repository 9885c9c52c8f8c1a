"""Checkpoints: ``RUN/step-NNNNNNNN/`` folders, written atomically, verified on load, pruned to the last k.

A checkpoint holds the trainable weights (LoRA adapters, behaviour embeddings, heads; the frozen
pretrained base is referenced by the config, not copied), optimizer and scheduler state, every
rank's RNG and data-stream position, and the train state (step, tokens, best metric). It is
written into a hidden temporary folder and renamed into place; ``meta.json`` with the sha256 of
every file is written last, so a folder without it, or whose files do not match it, is not a
checkpoint and is skipped with a message naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data_sharding.vocab import NUM_RESERVED_ITEMS, UNK_ITEM
from trainer.errors import ConfigError
from trainer.item_rows import ITEM_ROWS, read_full_table, sharded_names

META = "meta.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER = "optimizer.pt"
"""Optimizer (unless DeepSpeed shards it) and scheduler state."""
STATE = "state.json"
"""The train state: step, tokens, seconds, best metric, vocab version, world size."""
ZERO_DIR = "zero"
"""DeepSpeed's own per-rank files (sharded optimizer states) inside a checkpoint."""


@dataclass
class CheckpointConfig:
    """When to checkpoint and how many to keep."""

    every_steps: int = 500
    """Save every N optimizer steps (0: only at the end and on a signal)."""
    every_minutes: float = 0.0
    """Also save when this many minutes passed since the last checkpoint (0: off)."""
    keep_last: int = 2
    resume: str = "auto"
    """auto (latest valid checkpoint of the run, if any), none, or a checkpoint folder."""

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.every_minutes < 0 or self.keep_last < 1:
            raise ConfigError("checkpoint.every_steps must be >= 0 and checkpoint.keep_last >= 1")


def step_dir(run: Path, step: int) -> Path:
    return run / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights that training changes (requires_grad), detached and contiguous; a sharded item
    table's rows are not among them (each rank saves its own: trainer.sharded_run.save_rows); plus the
    buffers modules name in ``checkpoint_buffers`` (a tuned text tower's cache)."""
    skip = sharded_names(model)
    state = {
        n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad and n not in skip
    }
    state.update({n: b.detach().contiguous().clone() for n, b in saved_buffers(model).items()})
    return state


def saved_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State that is not a weight but that training builds and a checkpoint keeps (a tuned text
    tower's cached vectors): the buffers each module names in ``checkpoint_buffers``."""
    return {
        f"{prefix}.{name}" if prefix else name: getattr(module, name)
        for prefix, module in model.named_modules()
        for name in getattr(module, "checkpoint_buffers", ())
    }


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def temp_dir(target: Path) -> Path:
    """Where ``target`` is assembled before it is renamed into place (the same on every rank)."""
    return target.with_name(f".{target.name}.tmp")


def begin_checkpoint(target: Path) -> Path:
    """A fresh, empty temporary folder for ``target`` (main process; other ranks then write into it)."""
    tmp = temp_dir(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def finish_checkpoint(tmp: Path, target: Path, weights: dict, optimizer: dict, state: dict) -> Path:
    """Add the weights, optimizer and state files to ``tmp``, then checksum every file (``meta.json``,
    written last and fsynced) and rename the folder to ``target``."""
    save_file(weights, str(tmp / WEIGHTS))
    torch.save(optimizer, tmp / OPTIMIZER)
    (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    with open(tmp / META, "w") as f:
        json.dump({"files": files, "step": state["step"]}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def write_checkpoint(target: Path, weights: dict, optimizer: dict, rank_states: list[dict], state: dict) -> Path:
    """Write a complete checkpoint folder at ``target`` atomically from one process."""
    tmp = begin_checkpoint(target)
    for rank, rank_state in enumerate(rank_states):
        save_rank_state(tmp, rank, rank_state)
    return finish_checkpoint(tmp, target, weights, optimizer, state)


def save_rank_state(folder: Path, rank: int, state: dict) -> None:
    """One rank's RNG and data-stream position (``rank-N.pt``)."""
    torch.save(state, folder / f"rank-{rank}.pt")


def load_rank_state(path: Path, rank: int) -> dict:
    return torch.load(path / f"rank-{rank}.pt", weights_only=False)


def load_optimizer(path: Path) -> dict:
    return torch.load(path / OPTIMIZER, weights_only=False)


def verify(path: Path) -> str | None:
    """None if ``path`` is a complete checkpoint, else why not."""
    meta_path = path / META
    if not meta_path.exists():
        return "no meta.json (incomplete write)"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        return "meta.json is corrupt"
    for name, digest in meta["files"].items():
        file = path / name
        if not file.exists():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum (truncated or corrupt)"
    return None


def checkpoints(run: Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first (by step number, not by folder time)."""
    found = [p for p in run.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_valid(run: Path, log=print) -> Path | None:
    """Newest checkpoint that verifies; each invalid newer one is reported by name and skipped."""
    for path in reversed(checkpoints(run)):
        problem = verify(path)
        if problem is None:
            return path
        log(f"skipping checkpoint {path}: {problem}")
    return None


def load_weights(path: Path, full_table: bool = True) -> dict[str, torch.Tensor]:
    """The folder's dense weights; with ``full_table``, a sharded run's item rows read into the
    dense model's ``items.ids.weight`` (one process: `bgpt eval`, predict, export, retrain)."""
    weights = load_file(str(path / WEIGHTS))
    if full_table and (path / ITEM_ROWS).is_dir():
        weights["items.ids.weight"] = read_full_table(path / ITEM_ROWS)
    return weights


def read_state(path: Path) -> dict:
    return json.loads((path / STATE).read_text())


def prune(run: Path, keep_last: int) -> None:
    for old in checkpoints(run)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


@torch.no_grad()
def grow_and_load(model: torch.nn.Module, source: Path, log=print, table_apart: bool = False) -> list[str]:
    """Load ``source``'s trainable weights into ``model``, growing tables whose first dimension got
    larger (new ids). Returns the names of the grown tables. With ``table_apart`` (a model with a
    sharded item table) the id rows are left out on both sides: trainer.sharded_run loads them."""
    saved = load_weights(source, full_table=not table_apart)
    params = dict(model.named_parameters()) | saved_buffers(model)
    if table_apart:
        saved.pop("items.ids.weight", None)
        for name in sharded_names(model):
            params.pop(name, None)
    missing = [n for n, p in params.items() if p.requires_grad and n not in saved]
    if missing:
        raise ConfigError(f"{source}: lacks {missing[:3]}; was the model config changed since that run?")
    grown = []
    for name, value in saved.items():
        if name not in params:
            raise ConfigError(f"{source}: has {name}, which this model lacks; was the model config changed?")
        target = params[name]
        if target.shape == value.shape:
            target.copy_(value)
            continue
        if target.dim() != value.dim() or target.shape[1:] != value.shape[1:] or target.shape[0] < value.shape[0]:
            raise ConfigError(f"{source}: {name} has shape {tuple(value.shape)}, this model {tuple(target.shape)}")
        old = value.shape[0]
        target[:old] = value
        if name == "items.ids.weight" and getattr(model.items, "id_dropout", 0) > 0:
            # Trained with id dropout: the UNK row is what an item's features were learned beside.
            target[old:] = value[UNK_ITEM]
        elif name == "items.ids.weight" and getattr(model.items, "text_proj", None) is None:
            # No text to start from: the average known item is a neutral prior for a new one.
            target[old:] = value[NUM_RESERVED_ITEMS:].mean(dim=0)
        grown.append(f"{name} {old:,} -> {target.shape[0]:,} rows")
    tower = getattr(getattr(model, "items", None), "tower", None)
    if grown and tower is not None:  # new items' text rows from the tuned tower, not the frozen one
        tower.refresh(model.items.text)
    for line in grown:
        log(f"grew {line}")
    return grown
