"""Synthetic behaviour logs with structure a sequence model can learn.

The generator is vectorised over users (one numpy step per sequence position for a chunk of
users), so 100M events take minutes, not hours. What it models:

- item popularity: Zipf over a random permutation of the catalogue;
- tastes: every item belongs to a category; every user prefers one or two categories;
- sequential transitions: each item has a few "next" items (same category) that users follow
  with probability ``follow_prob``: this is the signal next-item models pick up;
- bursty time: sessions of short gaps (about a minute) separated by gaps of days;
- event types: a view -> click -> cart -> purchase funnel as a Markov chain;
- ratings: 1..5, higher when the item is in the user's preferred categories;
- item titles: words from the item's category, so text-based item embeddings carry signal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

EVENT_TYPES = ("view", "click", "cart", "purchase")
# Row = current type, column = next type (view, click, cart, purchase).
TYPE_TRANSITIONS = np.array(
    [
        [0.62, 0.28, 0.08, 0.02],
        [0.50, 0.20, 0.25, 0.05],
        [0.40, 0.10, 0.10, 0.40],
        [0.90, 0.10, 0.00, 0.00],
    ]
)
CATEGORIES = (
    ("running", ("Shoe", "Sock", "Vest", "Cap", "Belt")),
    ("cycling", ("Helmet", "Glove", "Light", "Pump", "Saddle")),
    ("camping", ("Tent", "Lantern", "Stove", "Mat", "Tarp")),
    ("fishing", ("Rod", "Reel", "Lure", "Line", "Net")),
    ("yoga", ("Mat", "Block", "Strap", "Towel", "Bolster")),
    ("climbing", ("Rope", "Harness", "Chalk", "Carabiner", "Belay")),
    ("swimming", ("Goggles", "Fin", "Kickboard", "Cap", "Buoy")),
    ("tennis", ("Racket", "Ball", "Grip", "String", "Bag")),
)
ADJECTIVES = ("Pro", "Ultra", "Lite", "Trail", "Classic", "Aero", "Storm", "Summit", "Rapid", "Core")


@dataclass(frozen=True)
class SynthConfig:
    """What to generate."""

    events: int = 200_000
    """Approximate number of events (the exact count is printed and returned)."""
    users: int = 5_000
    items: int = 2_000
    seed: int = 0
    follow_prob: float = 0.55
    """Probability that the next item is one of the current item's successors."""
    taste_prob: float = 0.8
    """Otherwise: probability of drawing from the user's preferred categories (else: global)."""
    zipf_exponent: float = 1.05
    successors: int = 3
    start_time: int = 1_577_836_800
    """Unix seconds of the earliest possible event (2020-01-01)."""
    span_days: int = 365
    time_unit: str = "s"
    """Unit of the written timestamps: "s" (unix seconds) or "ms"."""

    def __post_init__(self) -> None:
        if self.events < self.users:
            raise ValueError(f"--events ({self.events}) must be at least --users ({self.users})")
        if self.items < 2 * len(CATEGORIES):
            raise ValueError(f"--items must be at least {2 * len(CATEGORIES)}")
        if self.time_unit not in ("s", "ms"):
            raise ValueError("--time-unit must be 's' or 'ms'")


class _Catalogue:
    """Item categories, popularity and successor tables."""

    def __init__(self, cfg: SynthConfig, rng: np.random.Generator) -> None:
        n = cfg.items
        self.num_categories = len(CATEGORIES)
        self.category = rng.integers(0, self.num_categories, size=n)
        weights = 1.0 / np.arange(1, n + 1) ** cfg.zipf_exponent
        self.popularity = weights[rng.permutation(n)]
        self.global_cdf = np.cumsum(self.popularity) / self.popularity.sum()
        # One cumulative distribution per category, laid end to end with category c's values in
        # [c, c + 1), so a single searchsorted samples from many categories at once.
        order = np.lexsort((np.arange(n), self.category))
        self.items_by_category = order
        cdf = np.empty(n)
        for c in range(self.num_categories):
            members = order[self.category[order] == c]
            p = self.popularity[members]
            cdf[self.category[order] == c] = c + np.cumsum(p) / p.sum() - 1e-12
        self.category_cdf = cdf
        self.successor = self._successors(cfg, rng)

    def _successors(self, cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
        u = rng.random((cfg.items, cfg.successors))
        return self.sample_in_category(np.repeat(self.category, cfg.successors), u.ravel()).reshape(
            cfg.items, cfg.successors
        )

    def sample_in_category(self, categories: np.ndarray, u: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.category_cdf, categories + u, side="right")
        return self.items_by_category[np.minimum(idx, len(self.category_cdf) - 1)]

    def sample_global(self, u: np.ndarray) -> np.ndarray:
        return np.minimum(np.searchsorted(self.global_cdf, u, side="right"), len(self.global_cdf) - 1)


def _sequence_lengths(cfg: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed lengths (min 3) that add up to ``cfg.events``."""
    raw = rng.lognormal(mean=0.0, sigma=1.0, size=cfg.users)
    lengths = np.maximum(3, np.floor(raw / raw.sum() * cfg.events)).astype(np.int64)
    # Put the rounding remainder on random users so the total is exact.
    diff = cfg.events - int(lengths.sum())
    if diff > 0:
        np.add.at(lengths, rng.integers(0, cfg.users, size=diff), 1)
    return lengths


def _generate_chunk(
    cfg: SynthConfig, cat: _Catalogue, rng: np.random.Generator, user_ids: np.ndarray, lengths: np.ndarray
) -> dict[str, np.ndarray]:
    """Events for a chunk of users, as flat arrays in (user, time) order.

    Users are sorted longest first, so the users still active at position t are a prefix
    [:active[t]]; items and types are generated position by position into a flat position-major
    array (position t's events at ``col[t]:col[t] + active[t]``), which holds exactly the chunk's
    events whatever the longest sequence (a dense users x longest matrix would not)."""
    order = np.argsort(-lengths, kind="stable")
    user_ids, lengths = user_ids[order], lengths[order]
    n_users, total = len(user_ids), int(lengths.sum())
    active = np.bincount(lengths, minlength=int(lengths.max()) + 1)[::-1].cumsum()[::-1][1:]
    col = np.concatenate([[0], np.cumsum(active)])
    taste = rng.integers(0, cat.num_categories, size=(n_users, 2))
    items = np.empty(total, dtype=np.int64)
    types = np.zeros(total, dtype=np.int64)
    items[: active[0]] = cat.sample_in_category(taste[:, 0], rng.random(n_users))
    type_cdf = np.cumsum(TYPE_TRANSITIONS, axis=1)
    for t in range(1, len(active)):
        n, here, before = int(active[t]), int(col[t]), int(col[t - 1])
        prev = items[before : before + n]
        choice = rng.random(n)
        step = cat.successor[prev, rng.integers(0, cfg.successors, size=n)]
        which, u_taste, u_global = rng.integers(0, 2, n), rng.random(n), rng.random(n)
        # Only the events that take a branch search its distribution (the searches are most of the cost).
        in_taste = (choice >= cfg.follow_prob) & (choice < cfg.follow_prob + (1 - cfg.follow_prob) * cfg.taste_prob)
        anywhere = choice >= cfg.follow_prob + (1 - cfg.follow_prob) * cfg.taste_prob
        rows = np.flatnonzero(in_taste)
        step[rows] = cat.sample_in_category(taste[rows, which[rows]], u_taste[rows])
        step[anywhere] = cat.sample_global(u_global[anywhere])
        items[here : here + n] = step
        u = rng.random(n)[:, None]
        types[here : here + n] = (u > type_cdf[types[before : before + n]]).sum(axis=1)
    # Position-major -> (user, position) order.
    user = np.repeat(np.arange(n_users), lengths)
    first = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = np.arange(total) - first
    flat = col[position] + user
    items, types = items[flat], types[flat]

    # Bursty time: short gaps within a session, long gaps between sessions.
    new_session = rng.random(total) < 0.12
    gaps = np.where(new_session, rng.exponential(1.5 * 86_400, total), rng.exponential(90, total)).astype(np.int64)
    gaps[position == 0] = 0
    steps = np.cumsum(gaps + 1)
    span = cfg.span_days * 86_400
    start = cfg.start_time + (rng.random(n_users) * span * 0.5).astype(np.int64)
    times = start[user] + steps - steps[first]

    liked = (cat.category[items] == taste[user, 0]) | (cat.category[items] == taste[user, 1])
    rating = np.clip(np.rint(2.6 + 1.4 * liked + rng.normal(0, 0.8, total)), 1, 5)
    return {
        "user": user_ids[user],
        "item": items,
        "time": times * (1000 if cfg.time_unit == "ms" else 1),
        "type": types,
        "rating": rating,
    }


def _prefixed(prefix: str, ids: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pa.array(ids).cast(pa.string()), "")


def _to_table(chunk: dict[str, np.ndarray], rng: np.random.Generator) -> pa.Table:
    # Logs arrive interleaved, not grouped by user: shuffle rows within the chunk.
    order = rng.permutation(len(chunk["user"]))
    type_names = pa.array(EVENT_TYPES)
    return pa.table(
        {
            "user_id": _prefixed("u", chunk["user"][order]),
            "item_id": _prefixed("i", chunk["item"][order]),
            "timestamp": pa.array(chunk["time"][order]),
            "event_type": type_names.take(pa.array(chunk["type"][order])),
            "rating": pa.array(chunk["rating"][order].astype(np.int8)),
        }
    )


class _TableWriter:
    """Writes pyarrow tables to CSV, TSV, Parquet or JSONL chosen by file extension."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        name = path.name.removesuffix(".tmp")
        suffix = name[name.rfind(".") :].lower() if "." in name else ""
        self.kind = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl"}.get(suffix)
        if self.kind is None:
            raise ValueError(f"{path}: unsupported extension {suffix!r} (use .csv, .tsv, .parquet or .jsonl)")
        if self.kind == "parquet":
            self._writer = pq.ParquetWriter(path, schema, compression="zstd")
        elif self.kind == "jsonl":
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        else:
            options = pacsv.WriteOptions(delimiter="\t" if self.kind == "tsv" else ",", quoting_style="needed")
            self._writer = pacsv.CSVWriter(path, schema, write_options=options)

    def write(self, table: pa.Table) -> None:
        if self.kind == "jsonl":
            for row in table.to_pylist():
                self._file.write(json.dumps(row) + "\n")
        else:
            self._writer.write_table(table)

    def close(self) -> None:
        (self._file if self.kind == "jsonl" else self._writer).close()


def _items_table(cfg: SynthConfig, cat: _Catalogue, rng: np.random.Generator) -> pa.Table:
    names = [CATEGORIES[c][0] for c in cat.category]
    nouns = [CATEGORIES[c][1][k] for c, k in zip(cat.category, rng.integers(0, 5, cfg.items), strict=True)]
    adjectives = [ADJECTIVES[k] for k in rng.integers(0, len(ADJECTIVES), cfg.items)]
    titles = [
        f"{adj} {name.title()} {noun} {num}"
        for adj, name, noun, num in zip(adjectives, names, nouns, rng.integers(10, 99, cfg.items), strict=True)
    ]
    return pa.table({"item_id": [f"i{i}" for i in range(cfg.items)], "title": titles, "category": names})


class _PartWriter:
    """Events into ``parts`` files ``part-00000<ext>`` ... in folder ``out`` (about equal event
    counts, each renamed into place when complete), or into the one file ``out`` when parts is 1."""

    def __init__(self, out: Path, parts: int, total: int, suffix: str) -> None:
        self.out, self.parts, self.total, self.suffix = out, parts, total, suffix
        self.part, self.written, self.paths = -1, 0, []
        self._writer: _TableWriter | None = None

    def _target(self) -> Path:
        return self.out if self.parts == 1 else self.out / f"part-{self.part:05d}{self.suffix}"

    def _close_part(self) -> None:
        if self._writer is not None:
            self._writer.close()
            if self.parts > 1:
                self._writer.path.replace(self._target())
            self.paths.append(self._target())
            self._writer = None

    def write(self, table: pa.Table) -> None:
        boundary = (self.part + 1) * self.total // self.parts
        if self._writer is None or (self.part < self.parts - 1 and self.written + table.num_rows // 2 >= boundary):
            self._close_part()
            self.part += 1
            target = self._target()
            self._writer = _TableWriter(
                target if self.parts == 1 else target.with_name(target.name + ".tmp"), table.schema
            )
        self._writer.write(table)
        self.written += table.num_rows

    def close(self) -> list[Path]:
        self._close_part()
        return self.paths


def generate(
    cfg: SynthConfig, out: Path, items_out: Path | None = None, chunk_events: int = 2_000_000, parts: int = 1
) -> int:
    """Write ``cfg.events`` events to ``out`` (and item titles to ``items_out``); return the count.

    With ``parts`` > 1, ``out`` is a folder of ``parts`` Parquet files (as a data lake holds a log);
    chunks are generated and written one at a time, so memory does not grow with ``cfg.events``."""
    rng = np.random.default_rng(cfg.seed)
    cat = _Catalogue(cfg, rng)
    lengths = _sequence_lengths(cfg, rng)
    user_ids = rng.permutation(cfg.users)
    bounds = np.searchsorted(np.cumsum(lengths), np.arange(chunk_events, int(lengths.sum()), chunk_events))
    chunks = np.split(np.arange(cfg.users), bounds)
    if parts > 1:
        out.mkdir(parents=True, exist_ok=True)
    writer = _PartWriter(out, parts, int(lengths.sum()), ".parquet" if parts > 1 else out.suffix)
    with tqdm(total=int(lengths.sum()), unit="ev", unit_scale=True, desc="synth", disable=None) as bar:
        for users in chunks:
            if len(users) == 0:
                continue
            table = _to_table(_generate_chunk(cfg, cat, rng, user_ids[users], lengths[users]), rng)
            writer.write(table)
            bar.update(table.num_rows)
    writer.close()
    if items_out is not None:
        items = _items_table(cfg, cat, rng)
        items_writer = _TableWriter(items_out, items.schema)
        items_writer.write(items)
        items_writer.close()
    return writer.written
