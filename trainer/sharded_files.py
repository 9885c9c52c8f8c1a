"""A sharded item table's checkpoint files (trainer.sharded_table): one safetensors file per rank
(its rows and their row-wise Adagrad accumulators) and an index that says which file holds which
rows, read back at any world size, or into a larger table (new items: `bgpt retrain`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

INDEX = "item_rows.json"
"""A sharded checkpoint's index: the table's shape and which file holds which rows."""


@torch.no_grad()
def save_table(table, folder: Path | str) -> None:
    """Write the table to ``folder`` as one file per rank (its rows and their accumulators,
    ``item_rows-RRRRR-of-WWWWW.safetensors``) and an index (``item_rows.json``, written last,
    by rank 0). No rank gathers the table. A collective: every rank calls it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rank, world = dist.get_rank(), dist.get_world_size()
    first, rows = table.local_rows()
    name = f"item_rows-{rank:05d}-of-{world:05d}.safetensors"
    tensors = {"rows": rows.detach().cpu().contiguous(), "accumulator": table.accumulator().cpu().contiguous()}
    save_file(tensors, str(folder / (name + ".tmp")), metadata={"first": str(first)})
    os.replace(folder / (name + ".tmp"), folder / name)
    shards = [None] * world
    dist.all_gather_object(shards, {"first": first, "count": rows.shape[0], "file": name})
    if rank == 0:
        index = {"num_items": table.num_items, "dim": table.dim, "optimizer": "exact_rowwise_adagrad"}
        index.update(vocab_version=table.vocab_version, world_size=world, shards=shards)
        (folder / (INDEX + ".tmp")).write_text(json.dumps(index, indent=2) + "\n")
        os.replace(folder / (INDEX + ".tmp"), folder / INDEX)
    dist.barrier()


@torch.no_grad()
def load_table(table, folder: Path | str, grow: bool = False) -> int:
    """Set this rank's rows and accumulators from a checkpoint of ``save_table``, written at any world
    size (each rank reads only the rows of its own slice from the files that hold them). With
    ``grow`` the checkpoint may hold fewer rows (an older vocabulary: `bgpt retrain`): they fill
    the first ids, and the rows past them keep their initial values and a zero accumulator.
    Returns the checkpoint's row count."""
    from safetensors import safe_open

    folder = Path(folder)
    index = read_index(folder, None if grow else table.num_items, table.dim)
    old = _source_rows(table, index["num_items"], index["dim"], folder / INDEX)
    first, rows = table.local_rows()
    accumulator, end, filled = table.accumulator(), min(first + rows.shape[0], old), 0
    for shard in index["shards"]:
        lo, hi = max(first, shard["first"]), min(end, shard["first"] + shard["count"])
        if lo >= hi:
            continue
        path = folder / shard["file"]
        try:
            with safe_open(str(path), "pt") as f:
                part = slice(lo - shard["first"], hi - shard["first"])
                rows[lo - first : hi - first] = f.get_slice("rows")[part]
                accumulator[lo - first : hi - first] = f.get_slice("accumulator")[part]
        except Exception as e:  # missing, truncated or foreign file: name it
            raise ValueError(f"sharded item table {path}: cannot read rows {lo}-{hi - 1}: {e}") from e
        filled += hi - lo
    if filled != max(0, end - first):
        raise ValueError(f"{folder / INDEX}: its shards do not cover rows {first}-{end - 1}")
    return old


@torch.no_grad()
def load_dense_rows(table, path: Path | str, name: str) -> int:
    """Set this rank's rows from the dense table ``name`` of a safetensors file (a dense run's
    weights), reading its own slice only; the file may hold fewer rows, as in ``load_table(grow=True)``.
    Returns the file's row count."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            part = f.get_slice(name)
            count, dim = part.get_shape()
            old = _source_rows(table, count, dim, path)
            first, rows = table.local_rows()
            end = min(first + rows.shape[0], old)
            if end > first:
                rows[: end - first] = part[first:end]
    except ValueError:  # the shape check above: already names the file
        raise
    except Exception as e:  # missing, truncated or foreign file: name it
        raise ValueError(f"{path}: cannot read the item table {name}: {e}") from e
    return old


def _source_rows(table, count: int, dim: int, where) -> int:
    if dim != table.dim or count > table.num_items:
        raise ValueError(
            f"{where}: a table of {count} x {dim} does not fit this one of {table.num_items} x {table.dim}"
        )
    return count


def read_index(folder: Path, num_items: int | None = None, dim: int | None = None) -> dict:
    """A sharded checkpoint's index, checked against the table's shape when it is given."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except FileNotFoundError:
        raise ValueError(f"{folder} holds no sharded item table ({INDEX} is missing)") from None
    except ValueError as e:
        raise ValueError(f"{folder / INDEX} is not valid JSON: {e}") from e
    if num_items is not None and (index.get("num_items"), index.get("dim")) != (num_items, dim):
        raise ValueError(
            f"{folder / INDEX}: a table of {index.get('num_items')} x {index.get('dim')}, "
            f"this one is {num_items} x {dim}"
        )
    return index
