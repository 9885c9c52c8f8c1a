"""Score priors: count memories beside the network, each adding learned offsets to item scores.

Transition prior: "after X, users did Y".

``model.transition_prior`` adds, for each of the history's last ``model.transition_steps`` items
X_d (d = 1 the last), ``weight_d x log(1 + count(X_d -> item))`` to every item's score. The counts
are the pairs of the events the run trains on, up to ``transition_steps`` events apart and
weighted 1/distance (the transition baseline's counts); each source item keeps its
``model.transition_neighbors`` largest. The weights are learned with the network: a kNN-LM style
interpolation of a neural model with a count model, in log-space. In training, the pair being
predicted is left out of its own count (so the weights learn how far the counts generalise, not
how well they memorise); with ``model.transition_causal`` each position counts only the pairs
completed before its target's time, as next-period scoring counts them. With ``model.transition_gate`` the weights also depend on the query:
``weight_d + gate(state)_d``, a linear function (learned from zero) of the state that scores the
items, so the network learns when a count deserves trust (a long gap since the last event, an
unusual last item) instead of one number per step. The counts are taken once when a run starts
(``RUN/item_pairs.npz``, kept with the run and copied into exports), so a run always scores with
the memory of its own training data; `bgpt retrain` counts again on the grown data. Scoring a
period (trainer.online_pairs: ``OnlinePairs``) and serving (``LivePairs``, fed by the events posted
to the server) add the pairs completed after the table's newest event (``counted_until``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from data_sharding.shards import SPLIT_TRAIN, SPLIT_VALID
from data_sharding.stream import iter_sequences
from data_sharding.vocab import PAD_ITEM
from trainer.errors import ConfigError
from trainer.online_pairs import OnlinePairs

PAIRS_FILE = "item_pairs.npz"
DENSE_TABLE_MAX = 64_000_000
"""Catalogues with at most this many item pairs (8,000 items) keep a dense count table (faster)."""


def count_pairs(
    data,
    num_items: int,
    neighbors: int,
    steps: int = 1,
    until_generation: int | None = None,
    include_valid: bool = False,
    timed: bool = False,
) -> dict[str, np.ndarray]:
    """CSR arrays (``crow`` (V+1,), ``col``, ``count``, ``steps``) of the training pairs up to
    ``steps`` apart (weight 1/distance) per source item: its ``neighbors`` largest (ties: smaller
    id), columns sorted; ``counted_until``: the newest counted event's time. ``timed``: also every occurrence of a kept pair with the time it became
    known (its second event's): ``timed_src``, ``timed_dst``, ``timed_at``, ``timed_weight``
    (model.transition_causal)."""
    splits = (SPLIT_TRAIN, SPLIT_VALID) if include_valid else (SPLIT_TRAIN,)
    keys, weights, known = [], [], []
    until = np.iinfo(np.int64).min
    for _, events in iter_sequences(data, until_generation=until_generation):
        keep = np.isin(events["split"], splits)
        items, ts = events["item"][keep].astype(np.int64), events["ts"][keep].astype(np.int64)
        until = max(until, int(ts.max())) if len(ts) else until
        for d in range(1, min(steps, len(items) - 1) + 1):
            keys.append(items[:-d] * num_items + items[d:])
            weights.append(np.full(len(items) - d, 1.0 / d))
            known.append(ts[d:])
    keys = np.concatenate(keys) if keys else np.empty(0, np.int64)
    weights = np.concatenate(weights) if weights else np.empty(0)
    unique, inverse = np.unique(keys, return_inverse=True)
    counts = np.bincount(inverse, weights=weights, minlength=len(unique))
    src, dst = unique // num_items, unique % num_items
    # Keep each source's top successors: order by (source, -count, destination), cut, re-sort.
    order = np.lexsort((dst, -counts, src))
    src, dst, counts = src[order], dst[order], counts[order]
    starts = np.searchsorted(src, np.arange(num_items))
    keep = np.arange(len(src)) - starts[src] < neighbors
    src, dst, counts = src[keep], dst[keep], counts[keep]
    order = np.lexsort((dst, src))
    src, dst, counts = src[order], dst[order], counts[order]
    crow = np.zeros(num_items + 1, dtype=np.int64)
    np.add.at(crow, src + 1, 1)
    out = {"crow": np.cumsum(crow), "col": dst, "count": counts.astype(np.float32), "steps": np.array(steps)}
    out["counted_until"] = np.array(until, np.int64)  # the newest counted event's time (live counts start after it)
    if timed:  # the occurrences of the kept pairs (their keys are sorted: src, then dst)
        kept = src * num_items + dst
        at = np.searchsorted(kept, keys).clip(max=max(0, len(kept) - 1))
        hit = kept[at] == keys if len(kept) else np.zeros(len(keys), bool)
        out.update(
            timed_src=keys[hit] // num_items,
            timed_dst=keys[hit] % num_items,
            timed_at=np.concatenate(known)[hit] if known else np.empty(0, np.int64),
            timed_weight=weights[hit],
        )
    return out


def save_pairs(path: Path, pairs: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **pairs)
    tmp.rename(path)


def load_pairs(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def last_items(items: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, steps: int):
    """(N, steps) items at positions pos, pos - 1, ... of ``rows`` (PAD where there is none)."""
    at = pos[:, None] - torch.arange(steps, device=pos.device)[None, :]
    ok = at >= 0
    clamped = at.clamp(min=0)
    found = items[rows[:, None], clamped]
    return torch.where(ok & mask[rows[:, None], clamped], found, torch.full_like(found, PAD_ITEM))


def window_prefixes(items: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(N, T) the window items at positions <= pos (PAD elsewhere): each query's visible history."""
    positions = torch.arange(items.shape[1], device=items.device)[None, :]
    return torch.where(mask & (positions <= pos[:, None]), items, torch.zeros_like(items))


class TransitionPrior(nn.Module):
    """Score offsets ``sum_d w_d x log(1 + count(source_d -> item))`` from a CSR pair table, with
    ``w_d`` the learned step weight (plus, with a gate, a linear function of the query's state)."""

    def __init__(self, pairs: dict[str, np.ndarray], num_items: int, gate_from: int = 0, causal: bool = False) -> None:
        super().__init__()
        crow = pairs["crow"]
        if len(crow) < num_items + 1:  # a grown vocabulary: new items have no pairs yet
            crow = np.concatenate([crow, np.full(num_items + 1 - len(crow), crow[-1])])
        self.num_items = num_items
        self.steps = int(pairs.get("steps", 1))
        self.register_buffer("crow", torch.from_numpy(np.asarray(crow[: num_items + 1], np.int64)), persistent=False)
        col = torch.from_numpy(np.asarray(pairs["col"], np.int64))
        self.register_buffer("col", col, persistent=False)
        self.register_buffer("count", torch.from_numpy(np.asarray(pairs["count"], np.float32)), persistent=False)
        # Sorted (source * V + destination) keys, for looking up single pairs.
        rows = torch.repeat_interleave(torch.arange(num_items), torch.diff(self.crow))
        self.register_buffer("keys", rows * num_items + col, persistent=False)
        self.weight = nn.Parameter(torch.zeros(self.steps))
        self.gate = nn.Linear(gate_from, self.steps) if gate_from else None
        """model.transition_gate: per-query offsets of the step weights, from the query state."""
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self._table: torch.Tensor | None = None
        self._work: torch.Tensor | None = None
        self.counted_until = int(pairs["counted_until"]) if "counted_until" in pairs else None
        """The newest counted event's time (ms): a live counter (bgpt serve) counts the pairs after it
        (None: counts taken before this was recorded)."""
        self.online: OnlinePairs | None = None
        """Pairs of the predicted period (trainer.online_pairs), added to the counts of queries scored
        with their time (``at``): each query counts those known before it."""
        self.timed: OnlinePairs | None = None
        """model.transition_causal: the training pairs with their times; in training each position
        counts those known before its target's time (scoring reads the whole table, all of it
        older than the period, plus the online pairs)."""
        if causal:
            if "timed_src" not in pairs:
                raise ConfigError(
                    "model.transition_causal needs the pairs' times, which these counts (item_pairs.npz) were "
                    "taken without: start the run afresh (--checkpoint.resume=none)"
                )
            self.timed = OnlinePairs(
                *(np.asarray(pairs[k]) for k in ("timed_src", "timed_dst", "timed_at", "timed_weight")), num_items
            )
            self.timed.index_pairs()

    def training_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T-1, steps): for each training position, its item and the ones before it."""
        items = torch.where(batch["mask"], batch["items"], torch.zeros_like(batch["items"]))[:, :-1]
        shifted = [torch.nn.functional.pad(items, (d, 0))[:, : items.shape[1]] for d in range(self.steps)]
        sources = torch.stack(shifted, dim=-1)
        if "positions" in batch:  # packed rows: no source from the window before
            within = batch["positions"][:, :-1, None] >= torch.arange(self.steps, device=sources.device)
            sources = torch.where(within, sources, torch.zeros_like(sources))
        if self.timed is not None:  # one more column: the target's time, before which pairs count
            sources = torch.cat([sources, batch["times"][:, 1:, None]], dim=-1)
        return sources

    def query_inputs(self, items: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, at=None) -> torch.Tensor:
        """(N, steps) sources of queries whose history ends at ``pos`` of each window row (``at``,
        the queries' times, is for priors that read it)."""
        return last_items(items, mask, torch.arange(len(items), device=items.device), pos, self.steps)

    def counts(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        """count(src[n] -> dst[n, c]) for (N,) sources and (N, C) (or (C,)) destinations."""
        dst = dst.expand(len(src), -1) if dst.dim() == 1 else dst
        query = src[:, None] * self.num_items + dst
        if not len(self.keys):
            return torch.zeros(query.shape, dtype=self.count.dtype, device=query.device)
        at = torch.searchsorted(self.keys, query).clamp(max=len(self.keys) - 1)
        found = self.keys[at] == query
        return torch.where(found, self.count[at], torch.zeros((), dtype=self.count.dtype, device=query.device))

    def _log_rows(self, src: torch.Tensor) -> torch.Tensor:
        """(N, V) log(1 + count) of every item after each source."""
        if self.num_items**2 <= DENSE_TABLE_MAX:  # a small catalogue: index rows of a (V, V) table
            if self._table is None or self._table.device != src.device or self._table.dtype != self.count.dtype:
                self._table = torch.log1p(self._scatter_rows(torch.arange(self.num_items, device=src.device)))
            return self._table[src]
        return torch.log1p(self._scatter_rows(src))

    def _scatter_rows(self, src: torch.Tensor) -> torch.Tensor:
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

    def features(
        self,
        src: torch.Tensor,
        dst: torch.Tensor | None = None,
        leave_out: torch.Tensor | None = None,
        at: torch.Tensor | None = None,
        online=None,
    ) -> torch.Tensor:
        """(steps, N, V) (``dst`` None) or (steps, N, C) log(1 + count) of each source column of
        ``src`` (N, steps) to every item / to ``dst`` (C,) or (N, C). ``leave_out`` (N,): each row's
        own target, whose pair from source d counted 1/d (training: the pair itself). ``at`` (N,):
        the queries' times, when :attr:`online` pairs (or ``online``, a caller's own counter with
        the same ``rows``) are counted (scoring every item only)."""
        online = (self.online if online is None else online) if at is not None else None
        if online is not None and (dst is not None or leave_out is not None):
            raise ValueError("online pairs are counted when scoring every item, not in training")
        if self._timed_inputs(src):  # training, causal: the pairs known before each target's time
            return torch.stack([torch.log1p(self._timed_counts(src, d, dst)) for d in range(self.steps)])
        out = []
        for d in range(self.steps):
            if online is not None:
                column = src[:, d]
                table = self._scatter_rows(torch.where(column < self.num_items, column, 0))
                live = online.rows(column, at, self.count.dtype)
                if live.shape[1] > table.shape[1]:  # items added after training (served): counted live only
                    table = torch.nn.functional.pad(table, (0, live.shape[1] - table.shape[1]))
                logs = torch.log1p(table + live)
            elif dst is None and leave_out is None:
                logs = self._log_rows(src[:, d])
            elif dst is None:
                rows = torch.empty(len(src), self.num_items, dtype=self.count.dtype, device=src.device)
                logs = self._step_rows(src, d, leave_out, rows)
            else:
                counts = self.counts(src[:, d], dst)
                if leave_out is not None:
                    own = (1.0 / (d + 1)) * (src[:, d] != PAD_ITEM).to(self.count.dtype)
                    hit = (dst if dst.dim() == 2 else dst[None, :]) == leave_out[:, None]
                    counts = torch.where(hit, (counts - own[:, None]).clamp(min=0), counts)
                logs = torch.log1p(counts)
            out.append(logs)
        if online is not None:  # an item posted between two steps' reads widens the later ones: one width
            width = max(o.shape[-1] for o in out)
            out = [torch.nn.functional.pad(o, (0, width - o.shape[-1])) for o in out]
        return torch.stack(out)

    def _timed_inputs(self, src: torch.Tensor) -> bool:
        """Training inputs of a causal prior (:meth:`training_inputs`: the target's time last)."""
        return self.timed is not None and src.shape[1] == self.steps + 1

    def _timed_counts(self, src: torch.Tensor, d: int, dst: torch.Tensor | None) -> torch.Tensor:
        """Counts from source column d of causal training inputs, of the pairs known before each
        row's target time (its own pair, known at that time, never counts): (N, V) or (N, C)."""
        at = src[:, self.steps]
        if dst is None:
            return self.timed.rows(src[:, d], at, self.count.dtype)
        return self.timed.counts(src[:, d], dst, at, self.count.dtype)

    def _step_rows(self, src: torch.Tensor, d: int, leave_out: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """features(src, leave_out=...)[d] written into ``out`` (N, V): reused buffers, because a
        fresh (N, V) allocation per call costs more in page faults than the gather."""
        if self._timed_inputs(src):
            return torch.log1p(self._timed_counts(src, d, None), out=out)
        column = src[:, d]
        if self.num_items**2 <= DENSE_TABLE_MAX:
            self._log_rows(column[:1])  # builds the table once
            torch.index_select(self._table, 0, column, out=out)
        else:
            out.copy_(self._log_rows(column))
        own = (1.0 / (d + 1)) * (column != PAD_ITEM).to(out.dtype)
        kept = (self.counts(column, leave_out[:, None])[:, 0].to(out.dtype) - own).clamp(min=0)
        out[torch.arange(len(src), device=src.device), leave_out] = torch.log1p(kept)
        return out

    def row_weights(self, states: torch.Tensor) -> torch.Tensor:
        """(N, steps) each query's step weights: the learned ones, plus the gate's function of the
        query's (N, H) scoring state when there is a gate (differentiable in all three)."""
        weights = self.weight[None, :].expand(len(states), -1)
        return weights if self.gate is None else weights + self.gate(states).to(weights.dtype)

    def add_training_offsets(
        self, scores: torch.Tensor, src: torch.Tensor, leave_out: torch.Tensor, weights: torch.Tensor, keep=False
    ) -> None:
        """Add to ``scores`` (N, V), in place, the offsets with each row's own pair left out, at the
        rows' ``weights`` (N, steps) (the full-softmax training path; ``keep``: nothing is kept, the
        rows are cheap to read again)."""
        work = self._workspace(len(src), scores.dtype, src.device)
        for d in range(self.steps):
            scores.addcmul_(self._step_rows(src, d, leave_out, work), weights[:, d : d + 1].to(scores.dtype))

    def training_weight_grad(self, src: torch.Tensor, leave_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """(N, steps) each row's sum of ``probs`` (N, V) x its step's features: the gradient of the
        rows' weights."""
        work = self._workspace(len(src), probs.dtype, src.device)
        grads = [torch.linalg.vecdot(probs, self._step_rows(src, d, leave_out, work)) for d in range(self.steps)]
        return torch.stack(grads, dim=1)

    def _workspace(self, rows: int, dtype, device) -> torch.Tensor:
        if self._work is None or self._work.shape[0] < rows or self._work.dtype != dtype or self._work.device != device:
            self._work = torch.empty(rows, self.num_items, dtype=dtype, device=device)
        return self._work[:rows]

    def offsets(
        self, src: torch.Tensor, dst=None, leave_out=None, weights: torch.Tensor | None = None, at=None, online=None
    ) -> torch.Tensor:
        """The score offsets: the sum of :meth:`features` over the sources, at the rows' ``weights``
        (N, steps) (:meth:`row_weights`; the step weights alone when None, which a gated prior
        refuses: it needs the states); ``at``: the queries' times (online pairs; ``online``: see
        :meth:`features`)."""
        if weights is None:
            if self.gate is not None:
                raise ValueError("a gated transition prior scores with row_weights(states)")
            weights = self.row_weights(src)  # without a gate it reads only the row count
        return torch.einsum("ns,snv->nv", weights.to(self.count.dtype), self.features(src, dst, leave_out, at, online))


class RepeatPrior(nn.Module):
    """``weight x log(1 + times the item occurs in the visible history)``: users coming back to what
    they had (repeat consumption). Learned with the network: positive on logs with repeats, negative
    where users never come back (it then learns what excluding history does)."""

    def __init__(self, num_items: int) -> None:
        super().__init__()
        self.num_items = num_items
        self.weight = nn.Parameter(torch.zeros(()))

    def training_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T-1, T): each training position's visible history (the window up to it)."""
        items = torch.where(batch["mask"], batch["items"], torch.zeros_like(batch["items"]))
        length = items.shape[1]
        query = torch.arange(length - 1, device=items.device)[:, None]
        key = torch.arange(length, device=items.device)[None, :]
        keep = (key <= query)[None]  # (1, T-1, T)
        if "positions" in batch:  # packed rows: only the query's own window
            keep = keep & (key >= query - batch["positions"][:, :-1, None])
        return torch.where(keep, items[:, None, :], torch.zeros((), dtype=items.dtype, device=items.device))

    def query_inputs(self, items: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, at=None) -> torch.Tensor:
        return window_prefixes(items, mask, pos)

    def features(self, history: torch.Tensor, dst: torch.Tensor | None = None) -> torch.Tensor:
        """log(1 + occurrences) in each row's ``history`` (N, L) of every item (N, V), or of ``dst``
        (C,) or (N, C)."""
        real = (history != PAD_ITEM).to(self.weight.dtype)
        if dst is None:
            counts = torch.zeros(len(history), self.num_items, dtype=self.weight.dtype, device=history.device)
            counts.scatter_add_(1, history, real)
            counts[:, PAD_ITEM] = 0
        else:
            dst = dst.expand(len(history), -1) if dst.dim() == 1 else dst
            counts = ((history[:, :, None] == dst[:, None, :]) * real[:, :, None]).sum(dim=1)
        return torch.log1p(counts)

    def grow(self, num_items: int) -> None:
        """A served model's catalogue grew (items added after training): count them in histories too."""
        self.num_items = max(self.num_items, num_items)

    def row_weights(self, states: torch.Tensor) -> torch.Tensor:
        """(N, 1): the one weight, for every row (the interface of TransitionPrior.row_weights)."""
        return self.weight.reshape(1, 1).expand(len(states), 1)

    def offsets(
        self, inputs: torch.Tensor, dst=None, leave_out=None, weights: torch.Tensor | None = None, at=None
    ) -> torch.Tensor:
        """Score offsets (``leave_out`` is ignored: a position's history never holds its target;
        ``at`` too: the history is the query's own); ``weights`` (N, 1): :meth:`row_weights` (the
        weight itself when None)."""
        return (self.weight if weights is None else weights) * self.features(inputs, dst)

    def add_training_offsets(
        self, scores: torch.Tensor, inputs: torch.Tensor, leave_out: torch.Tensor, weights: torch.Tensor, keep=False
    ) -> None:  # (keep: nothing to keep, the features are cheap to build again)
        scores.addcmul_(self.features(inputs).to(scores.dtype), weights.to(scores.dtype))

    def training_weight_grad(self, inputs: torch.Tensor, leave_out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """(N, 1) each row's gradient of its weight."""
        return torch.linalg.vecdot(probs, self.features(inputs).to(probs.dtype))[:, None]
