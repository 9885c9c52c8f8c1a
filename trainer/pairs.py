"""The transition prior: a count memory of "after X, users did Y" beside the network.

``model.transition_prior`` adds ``weight x log(1 + count(last item -> item))`` to every item's
score, where the counts are the consecutive pairs of the events the run trains on (each source
item keeps its ``model.transition_neighbors`` most frequent successors) and ``weight`` is learned
with the network (kNN-LM style interpolation of a neural model with a count model, here in
log-space). In training, the pair being predicted is left out of its own count, so the weight
learns how much the counts generalise rather than how well they memorise. The counts are taken
once when a run starts (``RUN/item_pairs.npz``, kept with the run and copied into exports), so a
run always scores with the memory of its own training data; `bgpt retrain` counts again on the
grown data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_sharding.shards import SPLIT_TRAIN, SPLIT_VALID
from data_sharding.stream import iter_sequences

PAIRS_FILE = "item_pairs.npz"


def count_pairs(
    data, num_items: int, neighbors: int, until_generation: int | None = None, include_valid: bool = False
) -> dict[str, np.ndarray]:
    """CSR arrays (``crow`` (V+1,), ``col``, ``count``) of consecutive training pairs per source
    item: its ``neighbors`` most frequent successors (ties: smaller id), columns sorted."""
    splits = (SPLIT_TRAIN, SPLIT_VALID) if include_valid else (SPLIT_TRAIN,)
    keys = []
    for _, events in iter_sequences(data, until_generation=until_generation):
        items = events["item"][np.isin(events["split"], splits)].astype(np.int64)
        if len(items) > 1:
            keys.append(items[:-1] * num_items + items[1:])
    unique, counts = np.unique(np.concatenate(keys) if keys else np.empty(0, np.int64), return_counts=True)
    src, dst = unique // num_items, unique % num_items
    # Keep each source's top successors: order by (source, -count, destination), cut, re-sort.
    order = np.lexsort((dst, -counts, src))
    src, dst, counts = src[order], dst[order], counts[order]
    starts = np.searchsorted(src, np.arange(num_items))
    rank = np.arange(len(src)) - starts[src]
    keep = rank < neighbors
    src, dst, counts = src[keep], dst[keep], counts[keep]
    order = np.lexsort((dst, src))
    src, dst, counts = src[order], dst[order], counts[order]
    crow = np.zeros(num_items + 1, dtype=np.int64)
    np.add.at(crow, src + 1, 1)
    return {"crow": np.cumsum(crow), "col": dst, "count": counts.astype(np.float32)}


def save_pairs(path: Path, pairs: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **pairs)
    tmp.rename(path)


def load_pairs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in ("crow", "col", "count")}


class TransitionPrior(nn.Module):
    """``weight x log(1 + count(source -> item))`` score offsets from a CSR pair table."""

    def __init__(self, pairs: dict[str, np.ndarray], num_items: int) -> None:
        super().__init__()
        crow = pairs["crow"]
        if len(crow) < num_items + 1:  # a grown vocabulary: new items have no pairs yet
            crow = np.concatenate([crow, np.full(num_items + 1 - len(crow), crow[-1])])
        self.num_items = num_items
        self.register_buffer("crow", torch.from_numpy(np.asarray(crow[: num_items + 1], np.int64)), persistent=False)
        col = torch.from_numpy(np.asarray(pairs["col"], np.int64))
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("count", torch.from_numpy(np.asarray(pairs["count"], np.float32)), persistent=False)
        # Sorted (source * V + destination) keys, for looking up single pairs.
        rows = torch.repeat_interleave(torch.arange(num_items), torch.diff(self.crow))
        self.register_buffer("keys", rows * num_items + col, persistent=False)
        self.weight = nn.Parameter(torch.zeros(()))

    def counts(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """count(src[n] -> dst[n, c]) for (N,) sources and (N, C) (or (C,)) destinations."""
        dst = dst.expand(len(src), -1) if dst.dim() == 1 else dst
        query = src[:, None] * self.num_items + dst
        at = torch.searchsorted(self.keys, query).clamp(max=max(0, len(self.keys) - 1))
        if not len(self.keys):
            return torch.zeros(query.shape, dtype=self.count.dtype, device=query.device)
        found = self.keys[at] == query
        return torch.where(found, self.count[at], torch.zeros((), dtype=self.count.dtype, device=query.device))

    def dense_counts(self, src: torch.Tensor) -> torch.Tensor:
        """(N, V) counts of every item after each source."""
        start, end = self.crow[src], self.crow[src + 1]
        lengths = end - start
        rows = torch.repeat_interleave(torch.arange(len(src), device=src.device), lengths)
        offsets = torch.arange(int(lengths.sum()), device=src.device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        entries = torch.repeat_interleave(start, lengths) + offsets
        out = torch.zeros(len(src), self.num_items, dtype=self.count.dtype, device=src.device)
        out[rows, self.col[entries]] = self.count[entries]
        return out

    def features(self, src: torch.Tensor, dst: torch.Tensor | None = None, leave_out: torch.Tensor | None = None):
        """log(1 + count) of (N, V) (``dst`` None) or (N, C) pairs; ``leave_out`` (N,): a column
        per row whose count drops by one (the training pair itself)."""
        counts = self.dense_counts(src) if dst is None else self.counts(src, dst)
        if leave_out is not None:
            cols = leave_out if dst is None else None
            if cols is not None:
                rows = torch.arange(len(src), device=src.device)
                counts[rows, cols] = (counts[rows, cols] - 1).clamp(min=0)
            else:
                hit = dst == leave_out[:, None] if dst.dim() == 2 else dst[None, :] == leave_out[:, None]
                counts = torch.where(hit, (counts - 1).clamp(min=0), counts)
        return torch.log1p(counts)
