"""Periods: which events next-period evaluation predicts, and what is known before them.

A *period* is one generation's new events, a time range ``[from, to)``, or the stored valid/test
split (leave-one-out or ``--split time``). :func:`iter_period` gives every user's events in time
order with two masks: the events to predict, and the events before the period (what models were
trained on and what baselines are fit on). A time range cuts off events at or after its end, so
they are never context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from data_sharding import shards, storage
from data_sharding.shards import SPLIT_NAMES, SPLIT_TRAIN
from data_sharding.stream import iter_sequences, iter_sequences_with_generation
from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError


def parse_time(text: str | int | None, flag: str) -> int | None:
    """Unix seconds, unix milliseconds (>= 1e11) or ISO 8601 (UTC when no zone) -> int64 ms."""
    if text is None:
        return None
    try:
        number = int(text)
        return number if number >= 10**11 else number * 1000
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        raise ConfigError(
            f"{flag} {text!r}: expected ISO 8601 (2024-05-01 or 2024-05-01T12:00:00Z) or unix time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


@dataclass(frozen=True)
class Period:
    """The events to predict: a generation's new events, a time range, or a stored split."""

    generation: int | None = None
    start_ms: int | None = None
    end_ms: int | None = None
    """Exclusive; None: to the end of the data."""
    split: str | None = None

    def label(self) -> str:
        if self.generation is not None:
            return f"generation {self.generation}"
        if self.split is not None:
            return f"{self.split} split"
        end = "end of data" if self.end_ms is None else _iso(self.end_ms)
        return f"{_iso(self.start_ms)} .. {end}"

    def to_dict(self) -> dict:
        return {"label": self.label(), **{k: v for k, v in dataclasses.asdict(self).items() if v is not None}}


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def resolve_period(
    root,
    generation: int | None = None,
    start: str | int | None = None,
    end: str | int | None = None,
    split: str | None = None,
) -> Period:
    """The period to predict from the options (at most one kind); by default the newest generation
    of a dataset with several, else the test split of a ``--split time`` dataset."""
    manifest = shards.load_manifest(root)
    latest = int(manifest["generation"])
    start_ms, end_ms = parse_time(start, "--from"), parse_time(end, "--to")
    kinds = sum(x is not None for x in (generation, start_ms if start_ms is not None else end_ms, split))
    if kinds > 1:
        raise ConfigError("choose one period: --generation, --from/--to, or --split")
    if end_ms is not None and start_ms is None:
        raise ConfigError("--to needs --from (the period is [from, to))")
    if start_ms is not None:
        if end_ms is not None and start_ms >= end_ms:
            raise ConfigError(f"--from {start} is not before --to {end}: the period is empty")
        return Period(start_ms=start_ms, end_ms=end_ms)
    if split is not None:
        if split not in ("valid", "test"):
            raise ConfigError(f"--split {split!r}: choose valid or test")
        return Period(split=split)
    if generation is None:
        if latest >= 2:
            generation = latest
        elif manifest["split"]["strategy"] == "time":
            return Period(split="test")
        else:
            raise ConfigError(
                f"{root} has one generation and no time split: name a period with --from/--to, add the "
                f"next period's events with `bgpt shard --append`, or shard with --split time"
            )
    if not 2 <= generation <= latest:
        raise ConfigError(
            f"--generation {generation}: choose 2..{latest} (generation 1 has no earlier events to learn from)"
            if latest >= 2
            else f"{root} has one generation: nothing before it to learn from"
        )
    return Period(generation=generation)


def previous_period(root, period: Period) -> Period | None:
    """The period just before ``period`` (to choose baseline settings on), when one exists: the
    previous generation (not the first), the range of the same length before a time range, the
    valid split before the test split."""
    if period.generation is not None:
        return Period(generation=period.generation - 1) if period.generation >= 3 else None
    if period.split is not None:
        return Period(split="valid") if period.split == "test" else None
    end = period.end_ms
    if end is None:
        end = 1 + max((int(ev["ts"].max()) for _, ev in iter_sequences(root) if len(ev)), default=period.start_ms)
    return Period(start_ms=2 * period.start_ms - end, end_ms=period.start_ms)


def iter_period(root, period: Period) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """(user, events, to-predict mask, before-the-period mask) per user, events in time order; for a
    time range, events at or after its end are cut off (never context)."""
    if period.generation is not None:
        for uidx, events, written_by in iter_sequences_with_generation(root, until_generation=period.generation):
            target = (events["new"] == 1) if written_by == period.generation else np.zeros(len(events), bool)
            yield uidx, events, target, ~target
        return
    for uidx, events in iter_sequences(root):
        if period.split is not None:
            target = events["split"] == SPLIT_NAMES[period.split]
            yield uidx, events, target, events["split"] == SPLIT_TRAIN
            continue
        if period.end_ms is not None:
            events = events[events["ts"] < period.end_ms]
        before = events["ts"] < period.start_ms
        yield uidx, events, ~before, before


def catalogue(root, period: Period) -> torch.Tensor:
    """(V,) bool: the items that exist for the period (for a generation: added up to it)."""
    manifest = shards.load_manifest(root)
    added = storage.read_parquet(root, manifest["vocab"]["files"]["items"], columns=["generation"])
    added = torch.from_numpy(added["generation"].to_numpy().astype(np.int64))
    mask = torch.ones(len(added), dtype=torch.bool)
    if period.generation is not None:
        mask &= added <= period.generation
    mask[:NUM_RESERVED_ITEMS] = False
    return mask


def newest_holdout(data) -> Period:
    """The period that data.validate_on_newest holds out: the newest generation (there must be an
    earlier one to train on)."""
    latest = int(shards.load_manifest(data)["generation"])
    if latest < 2:
        raise ConfigError(
            f"data.validate_on_newest: {data} has one generation; add the newest events with `bgpt shard --append`"
        )
    return Period(generation=latest)
