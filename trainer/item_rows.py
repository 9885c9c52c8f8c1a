"""The model's side of a sharded item table (issue 20): a step's item vectors as a small table
indexed by item id, the parameters DDP and the dense optimizer must leave to TorchRec, and the
dense row-wise Adagrad that matches FBGEMM's fused one (the same optimizer on both paths).

A sampled-softmax step reads the vectors of its batch's items and its negatives only
(``ItemEncoder.table(needed)``). With the dense table that is a full ``V x H`` tensor whose
``needed`` rows are complete; with the sharded table (trainer.sharded_table) it is a ``RowTable``:
the looked-up rows of the ``needed`` ids alone, indexed by item id as the full table is, so the
heads and the score priors run unchanged on ids.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ITEM_ROWS = "item_rows"
"""A sharded table's folder in a checkpoint and in ``best/`` (written by trainer.sharded_files.save_table)."""


class RowTable:
    """Vectors of the sorted unique item ids ``ids`` (``rows``, one per id), indexed by item id
    like a full table: ``table[items]`` for any tensor of ids among ``ids`` (the caller's
    contract: a step only reads rows it looked up; an id outside ``ids`` would read a neighbour)."""

    def __init__(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        if ids.ndim != 1 or rows.ndim != 2 or len(ids) != len(rows):
            raise ValueError(f"RowTable needs (N,) ids and (N, H) rows, got {tuple(ids.shape)} and {tuple(rows.shape)}")
        self.ids, self.rows = ids, rows

    def __getitem__(self, items: torch.Tensor) -> torch.Tensor:
        return self.rows[torch.searchsorted(self.ids, items)]

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype


def sharded_names(model: nn.Module) -> set[str]:
    """Names of the parameters and buffers that live in a sharded item table: TorchRec shards and
    updates them (fused optimizer), so DDP must not all-reduce them and AdamW must not hold them."""
    from trainer.sharded_table import ShardedItemTable

    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, ShardedItemTable):
            names.update(f"{prefix}.{n}" for n, _ in module.named_parameters())
            names.update(f"{prefix}.{n}" for n, _ in module.named_buffers())
    return names


def prepare_for_ddp(model: nn.Module, device: torch.device | str) -> bool:
    """Before ``accelerator.prepare``: tell any later ``DistributedDataParallel(model)``
    (accelerate's included) to ignore the sharded table's tensors, and place the other weights on
    ``device`` here. Returns whether the model has a sharded table (then pass it to ``prepare``
    with ``device_placement=False``): ``Module.to`` would copy the table's weight (TorchRec's
    ``TableBatchedEmbeddingSlice``; accelerate's ``cpu:0`` is another device to it) into a
    detached duplicate that nothing trains, 4 x dim bytes per row of every rank (measured: 0.74 GiB
    per rank appeared in ``prepare`` at 8M items on 2 ranks, hidden 64)."""
    from trainer.sharded_table import ShardedItemTable

    names = sharded_names(model)
    if not names:
        return False
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(names))
    inside = {id(m) for table in model.modules() if isinstance(table, ShardedItemTable) for m in table.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(device), recurse=False)
    return True


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters a torch optimizer steps: all but a sharded table's."""
    skip = sharded_names(model)
    return [p for n, p in model.named_parameters() if p.requires_grad and n not in skip]


class RowwiseAdagrad(torch.optim.Optimizer):
    """Exact row-wise Adagrad on dense 2-D parameters, as FBGEMM's fused kernel updates a sharded
    table: one accumulator per row, ``acc += mean(g * g, row); row -= lr * g / (sqrt(acc) + eps)``.
    Rows without gradient are unchanged (their accumulator gains 0), so stepping every row equals
    updating only the rows a step read."""

    def __init__(self, params, lr: float = 0.01, eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim != 2:
                    raise ValueError(f"row-wise Adagrad needs 2-D parameters (rows), got shape {tuple(p.shape)}")
                state = self.state[p]
                if "sum" not in state:
                    state["sum"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                g = p.grad.float()
                state["sum"] += (g * g).mean(1)
                p -= (group["lr"] * g / (state["sum"].sqrt() + group["eps"])[:, None]).to(p.dtype)
        return None


def read_full_table(folder: Path) -> torch.Tensor:
    """The whole ``num_items x dim`` table of a sharded checkpoint (``trainer.sharded_files.save_table``), read
    from its files in this process: no process group needed."""
    from safetensors import safe_open

    from trainer.sharded_files import read_index

    index = read_index(folder)
    table = torch.empty(index["num_items"], index["dim"])
    for shard in index["shards"]:
        path = folder / shard["file"]
        try:
            with safe_open(str(path), "pt") as f:
                table[shard["first"] : shard["first"] + shard["count"]] = f.get_tensor("rows")
        except Exception as e:  # missing, truncated or foreign file: name it
            raise ValueError(f"sharded item table {path}: cannot read its rows: {e}") from e
    return table
