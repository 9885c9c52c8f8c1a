"""Per-user time-ordered sequences: de-duplication, splits and the two passes over sorted events.

DuckDB sorts all events by (shard, user, timestamp, input order) out of core and streams them
back in Arrow batches. Pass 1 drops exact duplicates (same user, item, timestamp, type and
value; the first in input order stays), counts events per provisional item/type code and parks
each shard's rows in a temporary ``.npy``. Once the vocabulary is final, pass 2 maps codes to
ids, drops events of items under ``--min-item-count``, marks splits and writes the shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_sharding.errors import DataError
from data_sharding.shards import SEQ_DTYPE, SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID

STREAM_DTYPE = np.dtype(
    [("uidx", "<i4"), ("ts", "<i8"), ("ord", "<i8"), ("item", "<i4"), ("type", "<i2"), ("value", "<f4")]
)
# ord = generation << GEN_SHIFT | file << FILE_SHIFT | record: input order across generations and files.
GEN_SHIFT, FILE_SHIFT = 48, 40


@dataclass
class SplitConfig:
    """How held-out events are chosen; recorded per event in the shards."""

    strategy: str = "loo"
    """loo: per user, the last event is test and the second-to-last valid (users with >= 3 events);
    time: events at or after ``test_start`` are test, those in [valid_start, test_start) valid;
    none: every event trains (continual data: evaluate on the next generation with
    `bgpt eval --protocol next-period`, validate with data.validate_on_newest)."""
    valid_start: str | None = None
    """ISO 8601 time (time strategy only)."""
    test_start: str | None = None
    """ISO 8601 time (time strategy only)."""

    def __post_init__(self) -> None:
        if self.strategy not in ("loo", "time", "none"):
            raise DataError(f"unknown --split {self.strategy!r}; choose loo, time or none")
        if self.strategy == "time" and self.test_start is None:
            raise DataError("--split time needs --test-start (and optionally --valid-start)")
        if self.strategy != "time" and (self.test_start or self.valid_start):
            raise DataError("--valid-start/--test-start only apply to --split time")

    def to_dict(self) -> dict:
        return {"strategy": self.strategy, "valid_start": self.valid_start, "test_start": self.test_start}


def user_bounds(uidx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of each run of equal consecutive values in ``uidx``."""
    if len(uidx) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    starts = np.concatenate([[0], np.flatnonzero(uidx[1:] != uidx[:-1]) + 1])
    lengths = np.diff(np.concatenate([starts, [len(uidx)]]))
    return starts, lengths


def duplicate_mask(rows: np.ndarray) -> np.ndarray:
    """True for rows repeating an earlier row's (user, ts, item, type, value); rows sorted by (user, ts, ord)."""
    dup = np.zeros(len(rows), dtype=bool)
    same = (rows["uidx"][1:] == rows["uidx"][:-1]) & (rows["ts"][1:] == rows["ts"][:-1])
    if not same.any():
        return dup
    # Only rows sharing (user, ts) with a neighbour can be duplicates: sort those by content.
    cand = np.unique(np.concatenate([np.flatnonzero(same), np.flatnonzero(same) + 1]))
    sub = rows[cand]
    vbits = sub["value"].view(np.int32)
    order = np.lexsort((sub["ord"], vbits, sub["type"], sub["item"], sub["ts"], sub["uidx"]))
    s = sub[order]
    sv = vbits[order]
    equal = (
        (s["uidx"][1:] == s["uidx"][:-1])
        & (s["ts"][1:] == s["ts"][:-1])
        & (s["item"][1:] == s["item"][:-1])
        & (s["type"][1:] == s["type"][:-1])
        & (sv[1:] == sv[:-1])
    )
    dup[cand[order[1:][equal]]] = True
    return dup


def _batch_rows(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    rows = np.empty(batch.num_rows, dtype=STREAM_DTYPE)
    for name in STREAM_DTYPE.names:
        col = batch.column(name)
        rows[name] = col.to_numpy(zero_copy_only=False) if name != "value" else col.fill_null(np.nan).to_numpy()
    return batch.column("shard").to_numpy(), rows


def sorted_user_batches(reader: pa.RecordBatchReader) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(shard, rows) batches that never split a user across two batches."""
    carry_shard = carry_rows = None
    for batch in reader:
        if batch.num_rows == 0:
            continue
        shard, rows = _batch_rows(batch)
        if carry_rows is not None:
            shard, rows = np.concatenate([carry_shard, shard]), np.concatenate([carry_rows, rows])
        last = rows["uidx"][-1]
        cut = len(rows) - int(np.searchsorted(rows["uidx"][::-1] != last, True))
        carry_shard, carry_rows = shard[cut:], rows[cut:]
        if cut:
            yield shard[:cut], rows[:cut]
    if carry_rows is not None and len(carry_rows):
        yield carry_shard, carry_rows


@dataclass
class PassOneResult:
    shard_files: dict[int, Path]
    item_counts: np.ndarray
    type_counts: np.ndarray
    duplicates: int


def pass_one(
    reader: pa.RecordBatchReader,
    work: Path,
    generation: int,
    num_item_codes: int,
    num_type_codes: int,
    progress,
) -> PassOneResult:
    """De-duplicate the sorted stream, count new events per code and park each shard's rows in ``work``."""
    item_counts = np.zeros(num_item_codes, dtype=np.int64)
    type_counts = np.zeros(num_type_codes, dtype=np.int64)
    duplicates = 0
    pending: dict[int, list[np.ndarray]] = {}
    files: dict[int, Path] = {}

    def flush(below: int | None) -> None:
        for shard in sorted(pending):
            if below is not None and shard >= below:
                continue
            files[shard] = work / f"sorted-{shard:06d}.npy"
            np.save(files[shard], np.concatenate(pending.pop(shard)))

    for shard, rows in sorted_user_batches(reader):
        progress.update(len(rows))
        dup = duplicate_mask(rows)
        duplicates += int(dup.sum())
        rows, shard = rows[~dup], shard[~dup]
        is_new = (rows["ord"] >> GEN_SHIFT) == generation
        item_counts += np.bincount(rows["item"][is_new], minlength=num_item_codes)
        type_counts += np.bincount(rows["type"][is_new], minlength=num_type_codes)
        cuts = np.flatnonzero(shard[1:] != shard[:-1]) + 1
        for part_shard, part in zip(np.split(shard, cuts), np.split(rows, cuts), strict=True):
            pending.setdefault(int(part_shard[0]), []).append(part)
        flush(below=int(shard[-1]))
    flush(below=None)
    return PassOneResult(files, item_counts, type_counts, duplicates)


def split_flags(uidx: np.ndarray, ts: np.ndarray, split: SplitConfig, valid_ms: int | None, test_ms: int | None):
    """Split of every event (arrays sorted by user, then time)."""
    flags = np.full(len(uidx), SPLIT_TRAIN, dtype=np.int8)
    if split.strategy == "none":
        return flags
    if split.strategy == "time":
        if valid_ms is not None:
            flags[ts >= valid_ms] = SPLIT_VALID
        flags[ts >= test_ms] = SPLIT_TEST
        return flags
    starts, lengths = user_bounds(uidx)
    long_enough = lengths >= 3
    ends = (starts + lengths)[long_enough]
    flags[ends - 1] = SPLIT_TEST
    flags[ends - 2] = SPLIT_VALID
    return flags


def final_records(
    rows: np.ndarray,
    *,
    item_map: np.ndarray,
    type_map: np.ndarray,
    generation: int,
    split: SplitConfig,
    valid_ms: int | None,
    test_ms: int | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(SEQ_DTYPE records, their user indices, events dropped as rare) for one shard's sorted rows."""
    items = item_map[rows["item"]]
    keep = items >= 0
    rows, items = rows[keep], items[keep]
    records = np.empty(len(rows), dtype=SEQ_DTYPE)
    records["item"] = items
    records["ts"] = rows["ts"]
    records["type"] = type_map[rows["type"]]
    records["value"] = rows["value"]
    records["split"] = split_flags(rows["uidx"], rows["ts"], split, valid_ms, test_ms)
    records["new"] = (rows["ord"] >> GEN_SHIFT) == generation
    return records, rows, int((~keep).sum())
