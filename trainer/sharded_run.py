"""A training run on a sharded item table (issue 20): when `bgpt train` uses one
(``model.item_table``), and the run's side of it: the process group it needs, the rows' learning
rate, and the table's part of checkpoints and of the best weights.

A checkpoint of a sharded run keeps the dense weights as every run does (``weights.safetensors``)
and the table as one file per rank under ``item_rows/`` (trainer.sharded_table: rows and their
row-wise Adagrad accumulators). A run resumes at any world size; single-process tools (`bgpt
eval`, `predict`, `export`, `retrain`'s start) read the whole table into a dense model
(trainer.checkpoint.load_weights), which needs the table to fit one process's memory.
"""

from __future__ import annotations

import gc
import importlib.util
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.errors import ConfigError
from trainer.item_rows import ITEM_ROWS, sharded_names
from trainer.runtime import before_process_group
from trainer.sharded_files import load_dense_rows, load_table, save_table

SHARDED_FROM_ITEMS = 1_000_000
"""``model.item_table=auto`` shards catalogues of at least this many item ids (when the run's
settings allow it): at 1M items and hidden 64, the dense table with AdamW already takes 2 GiB per
rank and a 1.3 s step on 2 CPU ranks, the sharded one 0.5 GiB and 0.04 s
(benchmarks/results/catalogue_table.md)."""


def blockers(cfg, num_items: int, accumulation: int, deepspeed: bool) -> list[str]:
    """Why this run cannot train its items on a sharded table (empty: it can)."""
    out = []
    if not cfg.heads.sampled_for(num_items):
        out.append("heads.item_loss=sampled (a full softmax reads every row at every step)")
    if cfg.model.id_dropout > 0:
        out.append("model.id_dropout=0")
    if cfg.model.transition_prior or cfg.model.repeat_prior or cfg.model.trend_prior:
        out.append("no score priors (model.transition_prior / repeat_prior / trend_prior: not built for it)")
    if cfg.data.validate_on_newest:
        out.append("data.validate_on_newest=false (next-period validation is not built for it)")
    if cfg.train.ema_decay > 0:
        out.append("train.ema_decay=0 (the weight average copies every trainable row)")
    if deepspeed:
        out.append("DDP or one process, not DeepSpeed")
    if accumulation > 1:
        out.append("no gradient accumulation (the table steps at every backward)")
    if importlib.util.find_spec("torchrec") is None or importlib.util.find_spec("fbgemm_gpu") is None:
        out.append("torchrec and fbgemm-gpu(-cpu) installed (make venv; README 'Catalogue of 10M+ items')")
    return out


def use_sharded_table(cfg, num_items: int, accumulation: int, deepspeed: bool, log=print) -> bool:
    """Resolve ``model.item_table`` (dense, sharded, auto) for a run over ``num_items`` ids."""
    choice = cfg.model.item_table
    if choice == "dense":
        return False
    missing = blockers(cfg, num_items, accumulation, deepspeed)
    if choice == "sharded":
        if missing:
            raise ConfigError("model.item_table=sharded needs " + "; ".join(missing))
        return True
    if num_items < SHARDED_FROM_ITEMS:
        return False
    if missing:
        log(f"model.item_table auto -> dense for {num_items:,} items: a sharded table needs " + "; ".join(missing))
        return False
    log(f"model.item_table auto -> sharded: {num_items:,} items (>= {SHARDED_FROM_ITEMS:,})")
    return True


_OWN_GROUP = []
"""The process group ensure_process_group made (to release when the run ends)."""


def ensure_process_group() -> None:
    """TorchRec shards over the default process group: one process gets a group of its own."""
    if not dist.is_initialized():
        before_process_group()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP.append(dist.group.WORLD)


def release_process_group() -> None:
    """Destroy the group ensure_process_group made, if any (a launcher's group is left alone).
    First collect a finished run's objects: a sharded table's TorchRec modules hold the group in
    reference cycles, and the group (with its gloo threads) goes only when they do."""
    gc.collect()
    if _OWN_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP.clear()


def table_of(model):
    """The model's ShardedItemTable, or None for a dense model."""
    return getattr(getattr(model, "items", None), "sharded", None)


def set_row_lr(model, lr: float) -> None:
    """The fused optimizer's learning rate (FBGEMM reads it at the next backward)."""
    table = table_of(model)
    if table is not None:
        table.dmp.fused_optimizer.param_groups[0]["lr"] = lr
        table.dmp.fused_optimizer.step()  # only sets the rate: the rows were updated in the backward


def save_rows(model, folder: Path) -> None:
    """Every rank: the table's files into a checkpoint folder being assembled (a collective)."""
    table = table_of(model)
    if table is not None:
        save_table(table, folder / ITEM_ROWS)


def grow_and_load(model, source: Path, log=print) -> list[str]:
    """``train.init_from`` (`bgpt retrain`) into a model with a sharded table: the dense weights as
    trainer.checkpoint.grow_and_load loads them, the rows from ``source``'s table files (a sharded
    run: with their Adagrad accumulators) or its dense ``items.ids.weight``, each rank reading its
    own slice. Rows of ids new since ``source`` start as the dense path starts them: the mean known
    row without text, their initial values with text (its projection adds the text)."""
    from data_sharding.vocab import NUM_RESERVED_ITEMS
    from trainer import checkpoint as ckpt

    table = table_of(model)
    grown = ckpt.grow_and_load(model, source, log, table_apart=True)
    rows = source / ITEM_ROWS
    old = (
        load_table(table, rows, grow=True)
        if rows.is_dir()
        else load_dense_rows(table, source / ckpt.WEIGHTS, "items.ids.weight")
    )
    if old < table.num_items:
        if getattr(model.items, "text_proj", None) is None:
            table.fill_from(old, NUM_RESERVED_ITEMS)
        grown.append(f"item rows (sharded) {old:,} -> {table.num_items:,}")
        log(f"grew {grown[-1]}")
    return grown


def load_weights_into(model, folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """Dense weights by name (``weights``), and a sharded model's rows from ``folder``'s files."""
    table = table_of(model)
    if table is None:
        model.load_state_dict(weights, strict=False)
        return
    skip = sharded_names(model)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights and name not in skip:
                param.copy_(weights[name])
    load_table(table, folder / ITEM_ROWS)


def sharded_test(model, run: Path, cfg, part, device: torch.device) -> dict:
    """The final test of a sharded run: its best weights loaded into the trained model (every rank
    its slice), the test split ranked by slices; reported as trainer.run.evaluate_run reports it."""
    from trainer import checkpoint as ckpt
    from trainer.evaluate import eval_loader
    from trainer.sharded_eval import evaluate_sharded

    best = run / "best"
    load_weights_into(model, best, ckpt.load_weights(best, full_table=False))
    batches = eval_loader(cfg.data.root, "test", cfg.model.max_len, cfg.eval.batch_size)
    metrics = evaluate_sharded(model, batches, cfg.eval, device, part)
    return {"split": "test", "run": str(run), "exclude_seen": cfg.eval.exclude_seen, **metrics}
