"""Count baselines, scored by exactly the models' protocol (trainer.evaluate.rank_batches).

Each baseline is fit on the events *before* what it predicts (one pass: ``add_user`` per user's
earlier events in time order, then ``finish``) and scores every item for every query window, as a
model does; the query's own earlier events are read as context (the transition baseline's last
items, the history that ``exclude_seen`` removes), never counted.

- ``popularity``: events per item, all time.
- ``recent-popularity``: events per item in the last ``window_days`` before the newest fitted
  event ("what is popular now"); the window is chosen on the previous period.
- ``recent-popularity-online``: the same window ending at each query's time, the predicted
  period's earlier events counted (as a deployed counter has them; next-period scoring only).
- ``transition``: "after X, users did Y". Counts of ordered pairs of a user's events up to
  ``steps`` apart (weight 1/distance), optionally decayed by age (``half_life_days``), normalised
  per source item to P(Y | X); a query sums P(. | X) over its last ``steps`` items (weight
  1/distance). Items it cannot score are ordered by all-time popularity. The classic strong
  sequential baseline (item-to-item co-occurrence / first-order Markov chain).
- ``transition-online``: the same counts kept up to date during the predicted period, as a
  deployed count is: a query at time T also counts the period's pairs completed before T
  (trainer.online_pairs; next-period scoring only, else it is ``transition``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError
from trainer.trend_prior import EventTimes

DAY_MS = 86_400_000
KINDS = ("popularity", "recent-popularity", "recent-popularity-online", "transition", "transition-online")
# Fill weight of popularity under the transition scores: only decides among items whose
# transition score is exactly 0 (scores are float64, so it never reorders positive ones).
FILL_SCALE = 1e-12


@dataclass(frozen=True)
class BaselineParams:
    """The knobs of the count baselines (a value of None means "not used")."""

    window_days: float | None = None
    """recent-popularity: count only events in the last N days before the newest fitted event."""
    steps: int = 1
    """transition: pairs up to this many events apart, and the query's last this many items."""
    half_life_days: float | None = None
    """transition: a pair's weight halves every N days of age (None: no decay)."""
    online: bool = False
    """Also count the predicted period's events (pairs) before each query (the -online kinds)."""

    def describe(self, kind: str) -> dict:
        """The settings ``kind`` uses."""
        return {k: v for k, v in asdict(self).items() if k in KNOBS[kind] and v is not None}


KNOBS = {
    "popularity": (),
    "recent-popularity": ("window_days",),
    "recent-popularity-online": ("window_days",),
    "transition": ("steps", "half_life_days"),
    "transition-online": ("steps", "half_life_days"),
}


GRIDS: dict[str, list[BaselineParams]] = {
    "popularity": [BaselineParams()],
    "recent-popularity": [BaselineParams(window_days=d) for d in (1, 3, 7, 14, 30, 90, 180, 365)],
    "recent-popularity-online": [BaselineParams(window_days=d, online=True) for d in (1, 3, 7, 14, 30, 90, 180, 365)],
    "transition": [BaselineParams(steps=s, half_life_days=h) for s in (1, 2, 3) for h in (None, 30.0, 180.0, 730.0)],
    "transition-online": [
        BaselineParams(steps=s, half_life_days=h, online=True) for s in (1, 2, 3) for h in (None, 30.0, 180.0, 730.0)
    ],
}
"""Candidates tried on the previous period."""
DEFAULTS = {
    "popularity": BaselineParams(),
    "recent-popularity": BaselineParams(window_days=30),
    "recent-popularity-online": BaselineParams(window_days=30, online=True),
    "transition": BaselineParams(),
    "transition-online": BaselineParams(online=True),
}
"""Used when there is no earlier period to choose on."""


def _decay(ts: np.ndarray, now: int, half_life_days: float | None) -> np.ndarray:
    if half_life_days is None:
        return np.ones(len(ts))
    age_days = np.maximum(0, now - ts) / DAY_MS
    return np.exp2(-age_days / half_life_days)


class Popularity:
    """Events per item (all time, or within a trailing window): the same list for every query.
    With ``params.online`` and the period's events handed over (:meth:`observe`), each query counts
    the events in the window before its own time."""

    def __init__(self, num_items: int, params: BaselineParams = DEFAULTS["popularity"]) -> None:
        self.num_items, self.params = num_items, params
        self._items: list[np.ndarray] = []
        self._ts: list[np.ndarray] = []
        self.counts = np.zeros(num_items)
        self.fitted: tuple[np.ndarray, np.ndarray] | None = None
        self.online: EventTimes | None = None

    def add_user(self, items: np.ndarray, ts: np.ndarray) -> None:
        self._items.append(items)
        self._ts.append(ts)

    def finish(self) -> Popularity:
        items = np.concatenate(self._items) if self._items else np.empty(0, np.int64)
        ts = np.concatenate(self._ts) if self._ts else np.empty(0, np.int64)
        keep = np.ones(len(ts), bool)
        if self.params.window_days is not None and len(ts):
            keep = ts >= ts.max() - self.params.window_days * DAY_MS
        self.counts = np.bincount(items[keep], minlength=self.num_items).astype(np.float64)
        self.fitted = (items, ts) if self.params.online else None
        self._items, self._ts = [], []
        self._scores = torch.from_numpy(self.counts)
        self._scores[:NUM_RESERVED_ITEMS] = float("-inf")
        return self

    def observe(self, pairs) -> None:
        """The predicted period (trainer.online_pairs.PeriodPairs), or None: counted only with
        ``params.online``."""
        self.online = None
        if pairs is not None and self.fitted is not None:
            items, ts = pairs.events()
            self.online = EventTimes(
                np.concatenate([self.fitted[0], items]), np.concatenate([self.fitted[1], ts]), self.num_items
            )

    def __call__(self, batch, rows, pos, mask) -> torch.Tensor:
        if self.online is None:
            return self._scores.to(batch["items"].device).expand(len(rows), -1).clone()
        at = batch["times"].cpu()[rows.cpu(), pos.cpu() + 1]
        start = at - int(self.params.window_days * DAY_MS) if self.params.window_days else torch.full_like(at, -(2**62))
        scores = self.online.rows(start, at).to(torch.float64)
        scores[:, :NUM_RESERVED_ITEMS] = float("-inf")
        return scores.to(batch["items"].device)


class Transition:
    """P(next item | one of the last ``steps`` items), from counted pairs; popularity fills. With
    ``params.online`` and the period's pairs handed over (:meth:`observe`), each query's counts
    also hold the pairs known before its time."""

    def __init__(self, num_items: int, params: BaselineParams = DEFAULTS["transition"]) -> None:
        self.num_items, self.params = num_items, params
        self._pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._fill = Popularity(num_items)
        self.online = None

    def add_user(self, items: np.ndarray, ts: np.ndarray) -> None:
        self._fill.add_user(items, ts)
        for d in range(1, min(self.params.steps, len(items) - 1) + 1):
            self._pairs.append((items[:-d], items[d:], ts[d:], np.full(len(items) - d, 1.0 / d)))

    def finish(self) -> Transition:
        from scipy import sparse

        fill = self._fill.finish().counts
        self.fill = torch.from_numpy(FILL_SCALE * fill / max(1.0, fill.max()))
        self.fill[:NUM_RESERVED_ITEMS] = float("-inf")
        self.now = 0
        if self._pairs:
            src, dst, ts, weight = (np.concatenate(parts) for parts in zip(*self._pairs, strict=True))
            self.now = int(ts.max())
            weight = weight * _decay(ts, self.now, self.params.half_life_days)
        else:
            src = dst = np.empty(0, np.int64)
            weight = np.empty(0)
        self.counts = sparse.csr_matrix((weight, (src, dst)), shape=(self.num_items, self.num_items))
        self.counts.sum_duplicates()
        totals = np.asarray(self.counts.sum(axis=1)).ravel()
        self.probs = sparse.diags(1.0 / np.maximum(totals, 1e-300)) @ self.counts  # row-normalised, (V, V) CSR
        self._pairs = []
        return self

    def observe(self, pairs) -> None:
        """The predicted period's pairs (trainer.online_pairs.PeriodPairs), or None: counted only
        with ``params.online``."""
        self.online = pairs.get(self.params.steps) if pairs is not None and self.params.online else None

    def _sources(self, batch, rows, pos, mask) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per step d: (query row numbers, their d-th last item) of the queries that have one."""
        items, visible, rows, pos = batch["items"].cpu(), mask.cpu(), rows.cpu(), pos.cpu()
        out = []
        for d in range(self.params.steps):
            at = pos - d
            ok = at >= 0
            r = torch.arange(len(rows))[ok]
            real = visible[rows[ok], at[ok]]
            out.append((r[real], items[rows[ok], at[ok]][real]))
        return out

    def __call__(self, batch, rows, pos, mask) -> torch.Tensor:
        from scipy import sparse

        if self.online is not None:
            return self._online_scores(batch, rows, pos, mask)
        n = len(rows)
        sources = self._sources(batch, rows, pos, mask)
        weights = [np.full(len(r), 1.0 / (d + 1)) for d, (r, _) in enumerate(sources)]
        query = sparse.csr_matrix(
            (
                np.concatenate(weights),
                (np.concatenate([r for r, _ in sources]), np.concatenate([x for _, x in sources])),
            ),
            shape=(n, self.num_items),
        )
        scores = torch.from_numpy((query @ self.probs).toarray()) + self.fill
        return scores.to(batch["items"].device)

    def _online_scores(self, batch, rows, pos, mask) -> torch.Tensor:
        """As __call__, each query's rows of counts holding the period's pairs known before it."""
        at = batch["times"].cpu()[rows.cpu(), pos.cpu() + 1]
        half_life = self.params.half_life_days
        decay = None if half_life is None else (self.now, half_life * DAY_MS)
        scores = torch.zeros(len(rows), self.num_items, dtype=torch.float64)
        for d, (r, x) in enumerate(self._sources(batch, rows, pos, mask)):
            counts = torch.from_numpy(self.counts[x.numpy()].toarray()) + self.online.rows(x, at[r], decay=decay)
            totals = counts.sum(dim=1, keepdim=True).clamp(min=1e-300)
            scores[r] += counts / totals / (d + 1)
        return (scores + self.fill).to(batch["items"].device)


def build(kind: str, num_items: int, params: BaselineParams | None = None) -> Popularity | Transition:
    """An unfitted baseline of ``kind`` (feed it ``add_user`` then call ``finish``)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown baseline {kind!r}; choose {', '.join(KINDS)}")
    params = params or DEFAULTS[kind]
    return Transition(num_items, params) if kind.startswith("transition") else Popularity(num_items, params)
