"""Online pair counts: "after X, users did Y" pairs that happened during the predicted period.

A count memory taken when a model was trained (trainer.priors) or a baseline was fit
(trainer.baselines) knows nothing of the period it predicts. Yet when an event of the period is
predicted at time T, every pair of consecutive events completed before T has happened: a count
memory that is kept up to date as events arrive (as a deployed one is) has counted it. This
module collects the period's pairs with the time each became known (the time of its second event)
and gives, for a query at time T, the counts of the pairs known strictly before T (events at T
itself, the user's own included, are never counted: their order within one timestamp is unknown).
It is also the only source of counts for items first seen in the period, which no count table
taken before it can hold.

Used by next-period scoring (``eval.online_counts``) for the models' transition and trend priors
(trainer.trend_prior: the period's events themselves) and by the ``transition-online`` baseline; never for a stored valid/test split (leave-one-out), whose events
are not a period that unfolds in time.
"""

from __future__ import annotations

import contextlib
import threading
from functools import cache

import numpy as np
import torch

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.periods import Period, iter_period


class OnlinePairs:
    """The pairs of a period (source, destination, weight) with the time each became known; counts
    of those known before a query's time, as dense (N, V) rows."""

    def __init__(self, src: np.ndarray, dst: np.ndarray, known_at: np.ndarray, weight: np.ndarray, num_items: int):
        self.num_items = num_items
        keep = (src < num_items) & (dst < num_items)
        src, dst, known_at, weight = src[keep], dst[keep], known_at[keep], weight[keep]
        self.times = np.unique(known_at)  # a pair's time as its rank among these (fits an int64 key)
        rank = np.searchsorted(self.times, known_at)
        self.span = len(self.times) + 1
        order = np.lexsort((rank, src))
        self.keys = torch.from_numpy(src[order].astype(np.int64) * self.span + rank[order])
        self.dst = torch.from_numpy(dst[order].astype(np.int64))
        self.weight = torch.from_numpy(weight[order].astype(np.float64))
        self.known_at = torch.from_numpy(known_at[order].astype(np.int64))
        self._pairs: tuple[torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def rows(
        self, src: torch.Tensor, at: torch.Tensor, dtype=torch.float64, decay: tuple[int, float] | None = None
    ) -> torch.Tensor:
        """(N, V) summed weights of the pairs from ``src[n]`` known before ``at[n]`` (ms).
        ``decay`` (reference ms, half-life ms): each weight times 2 ** ((known_at - reference) /
        half-life), as a decayed count table weighs its pairs."""
        device = src.device
        out = torch.zeros(len(src), self.num_items, dtype=dtype, device=device)
        if not len(self.keys):
            return out
        keys, dst, weight = (t.to(device) for t in (self.keys, self.dst, self.weight))
        if decay is not None:
            weight = weight * torch.exp2((self.known_at.to(device) - decay[0]).to(torch.float64) / decay[1])
        before = torch.from_numpy(np.searchsorted(self.times, at.cpu().numpy(), side="left")).to(device)
        source = src.to(torch.int64) * self.span
        lo = torch.searchsorted(keys, source)
        hi = torch.searchsorted(keys, source + before)
        lengths = hi - lo
        rows = torch.repeat_interleave(torch.arange(len(src), device=device), lengths)
        starts = torch.repeat_interleave(lo - (torch.cumsum(lengths, 0) - lengths), lengths)
        entries = starts + torch.arange(len(rows), device=device)
        out.index_put_((rows, dst[entries]), weight[entries].to(dtype), accumulate=True)
        return out

    def counts(self, src: torch.Tensor, dst: torch.Tensor, at: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """(N, C) summed weights of the pairs ``src[n] -> dst[n, c]`` (``dst`` (N, C) or (C,))
        known before ``at[n]``: two binary searches per pair in a (pair, time rank) index with
        prefix sums of the weights (built on first use)."""
        dst = dst.expand(len(src), -1) if dst.dim() == 1 else dst
        device = src.device
        keys, cumulative = (t.to(device) for t in self.index_pairs())
        before = torch.from_numpy(np.searchsorted(self.times, at.cpu().numpy(), side="left")).to(device)
        base = (src[:, None].to(torch.int64) * self.num_items + dst) * self.span
        lo = torch.searchsorted(keys, base)
        hi = torch.searchsorted(keys, base + before[:, None])
        return (cumulative[hi] - cumulative[lo]).to(dtype)

    def index_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted ``(src * V + dst) * span + time rank`` keys and the prefix sums of their weights
        (:meth:`counts`; built once; ValueError when the keys cannot fit an int64)."""
        if self._pairs is not None:
            return self._pairs
        if self.num_items**2 * self.span >= 2**62:
            raise ValueError(
                f"{self.num_items:,} items x {self.span - 1:,} distinct pair times do not fit one int64 pair "
                "key: counting pairs by time needs a smaller catalogue or coarser timestamps"
            )
        src, rank = self.keys // self.span, self.keys % self.span
        keys, order = torch.sort((src * self.num_items + self.dst) * self.span + rank)
        cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(self.weight[order], 0)])
        self._pairs = (keys, cumulative)
        return self._pairs


def collect(root, period: Period, steps: int, num_items: int) -> OnlinePairs:
    """The period's pairs up to ``steps`` events apart (weight 1/distance, as the count tables),
    each pair's second event in the period (its first may be older)."""
    src, dst, known_at, weight = [], [], [], []
    for _, events, target, _ in iter_period(root, period):
        if not target.any():
            continue
        items, ts = events["item"].astype(np.int64), events["ts"]
        for d in range(1, min(steps, len(items) - 1) + 1):
            new = target[d:]
            src.append(items[:-d][new])
            dst.append(items[d:][new])
            known_at.append(ts[d:][new])
            weight.append(np.full(int(new.sum()), 1.0 / d))
    if not src:
        empty = np.empty(0, np.int64)
        return OnlinePairs(empty, empty, empty, np.empty(0), num_items)
    return OnlinePairs(*(np.concatenate(parts) for parts in (src, dst, known_at, weight)), num_items)


class PeriodPairs:
    """The pairs of one period, collected once per number of steps (scorers ask for their own)."""

    def __init__(self, root, period: Period, num_items: int) -> None:
        self.root, self.period, self.num_items = root, period, num_items
        self.get = cache(self._collect)
        self._events: tuple[np.ndarray, np.ndarray] | None = None

    def _collect(self, steps: int) -> OnlinePairs:
        return collect(self.root, self.period, steps, self.num_items)

    def events(self) -> tuple[np.ndarray, np.ndarray]:
        """(items, times) of every event of the period (the trend prior counts those before a query)."""
        if self._events is None:
            items, times = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
            for _, events, target, _ in iter_period(self.root, self.period):
                items.append(events["item"][target].astype(np.int64))
                times.append(events["ts"][target].astype(np.int64))
            self._events = (np.concatenate(items), np.concatenate(times))
        return self._events


@contextlib.contextmanager
def observing(scorers: list, pairs: PeriodPairs | None):
    """Within the block, every scorer that counts online (has ``observe``) holds ``pairs``; taken
    back after it (scorers are reused: a model keeps training after its validation)."""
    observers = [s for s in scorers if hasattr(s, "observe")] if pairs is not None else []
    for scorer in observers:
        scorer.observe(pairs)
    try:
        yield
    finally:
        for scorer in observers:
            scorer.observe(None)


class LivePairs:
    """Pairs counted as events arrive, for a served model (bgpt serve): what next-period scoring
    counts online, kept up to date by the events posted to the server. Pairs whose second event is
    not newer than ``since`` (the newest event the model's count table holds) are left out: the
    table counted them. ``rows`` answers as :meth:`OnlinePairs.rows` does (pairs known strictly
    before each query's time). Memory grows with the pairs counted until the next model version
    (whose table holds them) replaces this counter. Thread-safe."""

    def __init__(self, num_items: int, steps: int, since: int) -> None:
        self.num_items, self.steps, self.since = num_items, steps, since
        self._by_source: dict[int, tuple[list[int], list[int], list[float]]] = {}
        self._lock = threading.Lock()
        self.pairs = 0

    def add(self, items: list[int], times: list[int], new: list[bool]) -> int:
        """Count the pairs that end at the ``new`` events of one user's events ``items`` (in time
        order, ``times`` in ms): each with the up to ``steps`` events before it, weight 1/distance,
        known at its own time. Reserved ids and ids beyond the catalogue are not counted (items
        added after training are, once :meth:`grow` takes them in). Returns the number of pairs counted."""
        added = 0
        with self._lock:
            for j in range(len(items)):
                if not new[j] or times[j] <= self.since or not self._countable(items[j]):
                    continue
                for d in range(1, min(self.steps, j) + 1):
                    if not self._countable(items[j - d]):
                        continue
                    dst, known, weight = self._by_source.setdefault(items[j - d], ([], [], []))
                    dst.append(items[j])
                    known.append(times[j])
                    weight.append(1.0 / d)
                    added += 1
            self.pairs += added
        return added

    def grow(self, num_items: int) -> None:
        """Count pairs of the items added after training too (ids below ``num_items``)."""
        with self._lock:
            self.num_items = max(self.num_items, num_items)

    def _countable(self, item: int) -> bool:
        return NUM_RESERVED_ITEMS <= item < self.num_items

    def rows(self, src: torch.Tensor, at: torch.Tensor, dtype=torch.float64) -> torch.Tensor:
        """(N, V) summed weights of the pairs from ``src[n]`` known before ``at[n]`` (ms)."""
        with self._lock:  # the width and the pairs of one moment (an item may be added meanwhile)
            out = torch.zeros(len(src), self.num_items, dtype=dtype)
            entries = [(n, self._by_source.get(s)) for n, s in enumerate(src.tolist())]
            entries = [(n, tuple(np.asarray(part) for part in lists)) for n, lists in entries if lists]
        for n, (dst, known, weight) in entries:
            before = known < int(at[n])
            out[n].index_add_(0, torch.from_numpy(dst[before]), torch.from_numpy(weight[before]).to(dtype))
        return out.to(src.device)
