"""Trend prior: what is new and popular at the moment of the prediction.

``model.trend_prior`` adds to every item's score, at the prediction time T, learned multiples of
``log(1 + the item's events in [T - w, T))`` for each window w of ``model.trend_windows_days``,
and a learned bias by the item's age at T (the time since its first event, in log2-day buckets;
an item without an event before T has a bucket of its own). Only events strictly before T count:
in training, each position counts the training events before its target's time (never the target
itself, never later ones); in next-period scoring the period's own earlier events count too (as a
deployed counter would have them: trainer.online_pairs), which is how items first seen during the
period get a score from their first events. Recent popularity alone is a weak ranking on the
public logs measured, but it is what the network cannot know from its weights: the id vectors
were learned before the period, and a new item's id vector was never learned at all.

The events are taken once when a run starts (``RUN/item_events.npz``: item ids and times of
exactly the events the run trains on) and counted again by `bgpt retrain`. A served model
(trainer.inference, bgpt serve) counts the events posted to it on top of those
(:class:`LiveEvents`), and scores every request at its own time.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from data_sharding.shards import SPLIT_TRAIN, SPLIT_VALID
from data_sharding.stream import iter_sequences
from data_sharding.vocab import NUM_RESERVED_ITEMS

EVENTS_FILE = "item_events.npz"
DAY_MS = 86_400_000
AGE_BUCKETS = 16
"""Bucket 0: no event before T; bucket b >= 1: age in [2^(b-1) - 1, 2^b - 1) days (the last open)."""
ROWS_BUDGET = 1 << 22
"""Row x item counts held at once by :meth:`EventTimes.rows` (a block of rows)."""


def item_events(data, until_generation: int | None = None, include_valid: bool = False) -> dict[str, np.ndarray]:
    """{"item", "ts"}: every training event's item and time (ms)."""
    splits = (SPLIT_TRAIN, SPLIT_VALID) if include_valid else (SPLIT_TRAIN,)
    items, times = [], []
    for _, events in iter_sequences(data, until_generation=until_generation):
        keep = np.isin(events["split"], splits)
        items.append(events["item"][keep].astype(np.int64))
        times.append(events["ts"][keep].astype(np.int64))
    empty = np.empty(0, np.int64)
    return {"item": np.concatenate(items) if items else empty, "ts": np.concatenate(times) if times else empty}


def save_events(path, events: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **events)
    tmp.rename(path)


def load_events(path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


class EventTimes:
    """Each item's event times, sorted: counts of an item's events in [a, b) by two binary searches
    of a (item, time rank) key, and each item's first time."""

    def __init__(self, items: np.ndarray, ts: np.ndarray, num_items: int) -> None:
        keep = (items >= 0) & (items < num_items)
        items, ts = items[keep], ts[keep]
        self.times = torch.from_numpy(np.unique(ts))
        self.span = len(self.times) + 1
        rank = torch.searchsorted(self.times, torch.from_numpy(ts))
        self.keys = torch.sort(torch.from_numpy(items) * self.span + rank).values
        first = np.full(num_items, np.iinfo(np.int64).max)
        np.minimum.at(first, items, ts)
        self.first = torch.from_numpy(first)
        order = np.argsort(ts, kind="stable")  # the same events in time order, for whole rows
        self.ts_sorted = torch.from_numpy(ts[order])
        self.items_by_time = torch.from_numpy(items[order])
        self.num_items = num_items

    def snapshot(self) -> EventTimes:
        """Itself (it never changes): the interface a scorer reads, as :meth:`LiveEvents.snapshot`'s."""
        return self

    def counts(self, dst: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """Events of items ``dst`` (N, C) with times in [start, end) ((N,) each)."""
        base = dst * self.span
        lo = torch.searchsorted(self.times, start)[:, None]
        hi = torch.searchsorted(self.times, end)[:, None]
        return torch.searchsorted(self.keys, base + hi) - torch.searchsorted(self.keys, base + lo)

    def rows(self, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """(N, V) events of every item with times in [start, end) ((N,) each).

        A block of rows at a time, in the order of their ends. Short or scattered windows: one
        bincount of each window's events. Windows that move forward together (as the windows
        ``[T - w, T)`` of sorted times T do) and overlap: each row is the one before plus the
        events that entered at its end minus those that left at its start (one bincount of the
        entering and one of the leaving events, by row and item, and a running sum over the rows),
        so each event of the block's span is read once instead of once per window that holds it."""
        out = torch.zeros(len(start), self.num_items, dtype=torch.int64)
        order = torch.argsort(end)
        lo = torch.searchsorted(self.ts_sorted, start[order])
        hi = torch.maximum(torch.searchsorted(self.ts_sorted, end[order]), lo)  # an empty window counts 0
        monotone = len(lo) < 2 or not bool((lo[1:] < lo[:-1]).any())
        block = max(1, ROWS_BUDGET // max(1, self.num_items))
        for rows, a, b in zip(order.split(block), lo.split(block), hi.split(block), strict=True):
            # Sliding reads every event of the block's span (twice) and writes a few rows x items
            # arrays; one bincount per row reads each window's events: whichever reads less.
            if monotone and 2 * int(b[-1] - a[0]) + 3 * len(a) * self.num_items < int((b - a).sum()):
                out[rows] = self._sliding(a, b)
                continue
            for n, x, y in zip(rows.tolist(), a.tolist(), b.tolist(), strict=True):
                if y > x:
                    out[n] = torch.bincount(self.items_by_time[x:y], minlength=self.num_items)
        return out

    def _sliding(self, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        """(K, V) events at positions [lo_k, hi_k) of the time order, both nondecreasing in k."""
        first, last = int(lo[0]), int(hi[-1])  # hi_k >= lo_k >= lo_0
        span = torch.arange(first, last)
        items = self.items_by_time[first:last]

        def by_row(bounds: torch.Tensor) -> torch.Tensor:  # events before bounds[k], from k on
            keep = span < bounds[-1]
            row = torch.searchsorted(bounds, span[keep], right=True)
            return torch.bincount(row * self.num_items + items[keep], minlength=len(bounds) * self.num_items)

        entered = by_row(hi).sub_(by_row(lo))
        return entered.view(len(lo), self.num_items).cumsum(0)


class LiveEvents:
    """A run's event times (:class:`EventTimes`) plus the events counted as they arrive (a served
    model): counts and first times answer as EventTimes' do, over both. Events not newer than
    ``since`` (the newest event the run counted) are left out, as are reserved ids and items beyond
    the catalogue (items added after training are counted once :meth:`grow` takes them in). The live part is indexed again on the first read
    after an addition (it holds only the events since training). Thread-safe."""

    def __init__(self, base: EventTimes, since: int) -> None:
        self.base, self.since, self.num_items = base, since, base.num_items
        self._items: list[int] = []
        self._times: list[int] = []
        self._table: EventTimes | None = None
        self._lock = threading.Lock()
        self.events = 0

    def add(self, items: list[int], times: list[int]) -> int:
        """Count events (item ids, times in ms); returns how many were counted."""
        kept = [
            (i, t)
            for i, t in zip(items, times, strict=True)
            if t > self.since and NUM_RESERVED_ITEMS <= i < self.num_items
        ]
        if kept:
            with self._lock:
                self._items.extend(i for i, _ in kept)
                self._times.extend(t for _, t in kept)
                self._table = None
                self.events += len(kept)
        return len(kept)

    def grow(self, num_items: int) -> None:
        """Count the items added after training too (ids below ``num_items``): the run's table holds
        no events of theirs, so they are counted from their first posted event on."""
        with self._lock:
            self.num_items = max(self.num_items, num_items)
            self._table = None

    def snapshot(self) -> LiveSnapshot:
        """The counts as of now, over one catalogue size (a scorer reads one snapshot, so an item
        posted meanwhile cannot give its parts different widths)."""
        with self._lock:
            if self._table is None and self._items:
                self._table = EventTimes(
                    np.asarray(self._items, np.int64), np.asarray(self._times, np.int64), self.num_items
                )
            return LiveSnapshot(self.base, self._table, self.num_items)

    @property
    def first(self) -> torch.Tensor:
        return self.snapshot().first

    def counts(self, dst: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        return self.snapshot().counts(dst, start, end)

    def rows(self, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        return self.snapshot().rows(start, end)


class LiveSnapshot:
    """:class:`LiveEvents` at one moment: the run's table plus the live one, over ``num_items``
    items (ids beyond the run's catalogue have live events only)."""

    def __init__(self, base: EventTimes, live: EventTimes | None, num_items: int) -> None:
        self.base, self.live, self.num_items = base, live, num_items

    def snapshot(self) -> LiveSnapshot:
        return self

    def _wide(self, t: torch.Tensor, fill: int) -> torch.Tensor:
        """``t`` (..., base items) filled with ``fill`` up to ``num_items`` columns."""
        extra = self.num_items - t.shape[-1]
        if extra <= 0:
            return t
        return torch.cat([t, torch.full((*t.shape[:-1], extra), fill, dtype=t.dtype)], dim=-1)  # exact int64 fill

    @property
    def first(self) -> torch.Tensor:
        first = self._wide(self.base.first, int(np.iinfo(np.int64).max))
        return first if self.live is None else torch.minimum(first, self.live.first)

    def counts(self, dst: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        out = self.base.counts(dst, start, end)  # none for ids beyond the run's catalogue
        return out if self.live is None else out + self.live.counts(dst, start, end)

    def rows(self, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        out = self._wide(self.base.rows(start, end), 0)
        return out if self.live is None else out + self.live.rows(start, end)


AGE_EDGES = torch.tensor([(2**b - 1) * DAY_MS for b in range(1, AGE_BUCKETS - 1)])
"""Ages (ms) where buckets 2, 3, ... begin: bucket 1 + floor(log2(1 + age in days)), counted in integers."""


def age_buckets(first: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """(N, C) age buckets (AGE_BUCKETS) of items first seen at ``first`` (N, C), at times ``at`` (N,)."""
    age = at[:, None] - first
    bucket = torch.searchsorted(AGE_EDGES.to(age.device), age, right=True).add_(1)  # 1 + the edges an age has reached
    return bucket.masked_fill_(first >= at[:, None], 0)  # not seen before T (the age may wrap then)


class TrendPrior(nn.Module):
    """Score offsets ``sum_w weight_w x log(1 + events in the window w before T) + bias[age at T]``."""

    def __init__(self, events: dict[str, np.ndarray], num_items: int, windows_days: list[float]) -> None:
        super().__init__()
        self.num_items = num_items
        self.windows_ms = [int(d * DAY_MS) for d in windows_days]
        self.base = (events["item"], events["ts"])
        self.run_table = EventTimes(*self.base, num_items)
        """The run's own events, indexed once (restored after a period is scored, shared by a live table)."""
        self.table: EventTimes | LiveEvents = self.run_table
        self.weight = nn.Parameter(torch.zeros(len(self.windows_ms) + AGE_BUCKETS))
        """The windows' multiples, then one bias per age bucket (all learned from zero)."""
        self.windows_days = list(windows_days)
        self._held: tuple | None = None
        """(table, inputs, parts) of the last rows given training offsets (read once by the weight gradient)."""

    def live(self) -> LiveEvents:
        """Count events as they arrive from now on (a served model): the table becomes the run's
        events plus those (returned, for :meth:`LiveEvents.add`)."""
        ts = self.base[1]
        since = int(ts.max()) if len(ts) else np.iinfo(np.int64).min
        self.table = LiveEvents(self.run_table, since)
        return self.table

    def grow(self, num_items: int) -> None:
        """A served model's catalogue grew (items added after training): score and count them too."""
        if not isinstance(self.table, LiveEvents):
            self.live()  # (no events posted yet: the run's counts, over the wider catalogue)
        self.table.grow(num_items)
        self.num_items = self.table.num_items

    def observe(self, period_events: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Count the predicted period's events too (each query still counts only those before it);
        None: the run's own events again."""
        if period_events is None:
            self.table = self.run_table
            return
        items, ts = self.base
        items, ts = np.concatenate([items, period_events[0]]), np.concatenate([ts, period_events[1]])
        self.table = EventTimes(items, ts, self.num_items)

    def training_inputs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T-1): each training position's prediction time (its target's time)."""
        return batch["times"][:, 1:]

    def query_inputs(self, items, mask, pos, at: torch.Tensor | None = None) -> torch.Tensor:
        if at is None:
            raise ValueError("model.trend_prior scores at a time: give the queries' times")
        return at

    def row_weights(self, states: torch.Tensor) -> torch.Tensor:
        return self.weight[None, :].expand(len(states), -1)

    def _parts(self, at: torch.Tensor, dst: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """((windows, N, C) log(1 + counts), (N, C) age buckets) of items ``dst`` ((C,), (N, C) or
        None: every item) at times ``at`` (N,)."""
        device = at.device
        every = dst is None
        table, at = self.table.snapshot(), at.cpu()
        dst = torch.arange(table.num_items) if every else dst.cpu()
        inverse = None
        if dst.dim() == 1:  # the same items for every row: count once per distinct time
            at, inverse = torch.unique(at, return_inverse=True)
        dst = dst.expand(len(at), -1) if dst.dim() == 1 else dst

        def counts(w: int) -> torch.Tensor:
            return table.rows(at - w, at) if every else table.counts(dst, at - w, at)

        logs = torch.empty(len(self.windows_ms), *dst.shape, dtype=torch.float32)
        for k, w in enumerate(self.windows_ms):
            torch.log1p(counts(w), out=logs[k])
        buckets = age_buckets(table.first.expand(len(at), -1) if every else table.first[dst], at)
        if inverse is not None:
            logs, buckets = logs[:, inverse], buckets[inverse]
        return logs.to(device), buckets.to(device)

    def offsets(self, inputs, dst=None, leave_out=None, weights: torch.Tensor | None = None, at=None) -> torch.Tensor:
        """(N, C) offsets at the queries' times ``inputs`` (N,) (``leave_out``, ``at``: unused: a
        target's own event is never before its time)."""
        weights = self.row_weights(inputs) if weights is None else weights
        return self._combine(self._parts(inputs, dst), weights)

    def _combine(self, parts: tuple[torch.Tensor, torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        logs, buckets = parts
        k = len(self.windows_ms)
        scores = torch.einsum("nw,wnc->nc", weights[:, :k].to(logs.dtype), logs)
        return scores + torch.gather(weights[:, k:].to(logs.dtype), 1, buckets)

    def add_training_offsets(
        self, scores: torch.Tensor, inputs, leave_out, weights: torch.Tensor, keep: bool = False
    ) -> None:
        """``keep``: the counts are kept for :meth:`training_weight_grad` of the same rows, which a
        full softmax's backward asks for next (read once, then dropped)."""
        self._held = None
        parts = self._parts(inputs, None)
        if keep:
            self._held = (self.table, inputs, parts)
        scores += self._combine(parts, weights).to(scores.dtype)

    def training_weight_grad(self, inputs, leave_out, probs: torch.Tensor) -> torch.Tensor:
        """(N, windows + AGE_BUCKETS) each row's gradient of its weights: ``probs`` summed against
        each window's feature, and over the items of each age bucket."""
        held, self._held = self._held, None
        same = held is not None and held[0] is self.table and torch.equal(held[1], inputs)
        logs, buckets = held[2] if same else self._parts(inputs, None)
        windows = [torch.linalg.vecdot(probs, logs[w].to(probs.dtype)) for w in range(len(self.windows_ms))]
        ages = torch.zeros(len(probs), AGE_BUCKETS, dtype=probs.dtype, device=probs.device)
        ages.scatter_add_(1, buckets, probs)
        return torch.cat([torch.stack(windows, dim=1), ages], dim=1)
