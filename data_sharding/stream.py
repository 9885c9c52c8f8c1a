"""Resumable streaming over the shards: split by rank and worker, shuffled, windowed, collated.

The unit of data is a *sample*: one window of a user's sequence. Sample counts come from the
per-shard index files, so the loader knows every sample before reading a byte of a shard.

Each epoch the S = world_size x num_workers *slots* take equal, contiguous runs of the epoch's
global sample list (data_sharding.order), so every rank yields the same number of batches (no
hang at epoch end), and when S divides N every sample is seen exactly once per epoch.

Position = (epoch, batches consumed on this rank). Because the order is a pure function of
(seed, epoch, rank, slot), a restored loader recomputes which samples each worker already
produced and continues with exactly the batches an uninterrupted run would have produced next.
DataLoader workers are served round-robin, so on resume the worker roles are rotated to match.
On another world size or worker count, the samples not yet read are shared out anew.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_sharding import shards, storage
from data_sharding.batching import collate_windows
from data_sharding.errors import DataError, ShardError
from data_sharding.order import EpochOrder, Segment
from data_sharding.shards import SPLIT_NAMES


@dataclass
class StreamConfig:
    """How samples are cut, ordered and batched."""

    max_len: int = 50
    """Positions per window; a training window holds max_len + 1 events (inputs and next-event targets)."""
    batch_size: int = 64
    """Samples per batch on each rank (per device micro batch)."""
    seed: int = 0
    shuffle: bool = True
    split: str = "train"
    """train: windows over each user's training events (every event a target once);
    valid / test: one sample per held-out event, ending at it, with up to max_len events of history."""
    generations: str | int = "state"
    """state: each user's latest sequence across generations; latest: only the newest generation's
    shards (incremental training); or a generation number."""
    verify: bool = True
    """Check each shard's sha256 against the manifest when it is read."""
    pad_to_max_len: bool = False
    """Pad every batch to max_len + 1 positions (static shapes) instead of its longest window."""
    pack: bool = False
    """Training: pack a batch's windows into as few rows of ``pack_width`` positions as fit
    (first-fit decreasing), with a ``positions`` tensor that restarts at each window; the model
    then attends within each window only (block-diagonal causal mask). The same samples, targets
    and loss as unpacked batches, with few padded positions (short histories no longer pad to the
    batch's longest window)."""
    pack_width: int | None = None
    """Positions per packed row (default max_len + 1: one full window)."""
    pack_row_multiple: int = 1
    """A packed batch's rows are rounded up to a multiple of this (fixed shapes; batching.collate_windows)."""
    focus_new: bool = False
    """Incremental training: only windows holding the newest generation's events, and only those
    events as targets (the older events before them are context), plus the replay sample."""
    replay_fraction: float = 0.0
    """With focus_new: this share of users (a seeded hash of the user) also train on all their
    windows and targets, so the model keeps what it knew."""
    include_valid: bool = False
    """train: each user's validation events are training targets too (a final refit once the
    schedule was chosen on validation; the valid split is then no longer held out)."""
    until_generation: int | None = None
    """With generations=state: the dataset as it stood after this generation (each user's sequence
    from the newest generation <= it); later generations are not read."""

    def __post_init__(self) -> None:
        if self.max_len < 1 or self.batch_size < 1:
            raise DataError("max_len and batch_size must be >= 1")
        if not 0.0 <= self.replay_fraction <= 1.0:
            raise DataError("replay_fraction must be between 0 and 1")
        if self.include_valid and self.focus_new:
            raise DataError("include_valid (a refit on train + valid) does not combine with focus_new")
        if self.pack_row_multiple < 1:
            raise DataError(f"pack_row_multiple must be >= 1 (got {self.pack_row_multiple})")
        if self.split not in SPLIT_NAMES:
            raise DataError(f"unknown split {self.split!r}; choose train, valid or test")
        if self.pack_width is not None and self.pack_width < self.max_len + 1:
            raise DataError(
                f"pack_width {self.pack_width} cannot hold one window: a training window has up to "
                f"max_len + 1 = {self.max_len + 1} events"
            )
        if self.until_generation is not None and (self.generations != "state" or self.focus_new):
            raise DataError("until_generation reads the state at a generation: not with focus_new or one generation")


class ShardDataset(IterableDataset):
    """Iterable over collated batches of one rank; see the module docstring for the ordering."""

    def __init__(self, root: str | Path, cfg: StreamConfig, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        self.root, self.cfg, self.rank, self.world_size = storage.as_root(root), cfg, rank, world_size
        self.manifest = shards.load_manifest(self.root)
        self.shards = shards.manifest_shards(self.manifest, "all" if cfg.generations == "state" else cfg.generations)
        if cfg.until_generation is not None:
            if not 1 <= cfg.until_generation <= self._latest:
                raise DataError(f"{root}: no generation {cfg.until_generation} (the dataset has 1..{self._latest})")
            self.shards = [s for s in self.shards if s.generation <= cfg.until_generation]
        self._counts = self._window_counts()
        self.num_samples = int(sum(c.sum() for c in self._counts))
        self._position = torch.zeros(2, dtype=torch.int64)  # epoch, batches to skip (share_position)
        self.segments: list[Segment] = []
        """Earlier stretches of this epoch, read by another topology (data_sharding.order)."""

    # -- sample bookkeeping -------------------------------------------------------------------
    def _window_counts(self) -> list[np.ndarray]:
        """Windows per index row of every shard (0 for superseded or too short users)."""
        self.indexes = []
        for shard in self.shards:
            try:
                index = np.load(io.BytesIO(storage.read_bytes(self.root, shard.index)), allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ShardError(f"shard index {shard.index}: unreadable ({e})") from None
            if index.dtype != shards.INDEX_DTYPE or len(index) != shard.users:
                raise ShardError(f"shard index {shard.index}: does not match the manifest (corrupt)")
            self.indexes.append(index)
        last_gen = self._last_generations() if self.cfg.generations == "state" else None
        self._current = []
        counts = []
        for shard, index in zip(self.shards, self.indexes, strict=True):
            current = np.ones(len(index), bool) if last_gen is None else last_gen[index["uidx"]] == shard.generation
            self._current.append(current)
            counts.append(self._windows(index, current, shard.generation == self._latest))
        return counts

    def _last_generations(self) -> np.ndarray:
        """(users,) generation of each user's current sequence (0: none)."""
        if self.cfg.until_generation is None:
            users = storage.read_parquet(self.root, self.manifest["vocab"]["files"]["users"])
            last_gen = np.zeros(int(users["uidx"].to_numpy().max()) + 1 if users.num_rows else 0, np.int32)
            last_gen[users["uidx"].to_numpy()] = users["last_generation"].to_numpy()
            return last_gen
        top = max((int(index["uidx"].max()) for index in self.indexes if len(index)), default=-1)
        last_gen = np.zeros(top + 1, np.int32)
        for shard, index in zip(self.shards, self.indexes, strict=True):
            np.maximum.at(last_gen, index["uidx"], shard.generation)
        return last_gen

    @property
    def _latest(self) -> int:
        return int(self.manifest["generation"])

    def replayed(self, uidx: np.ndarray | int) -> np.ndarray:
        """Users in the replay sample: a seeded hash of the user index below replay_fraction."""
        u = np.asarray(uidx, dtype=np.uint64)
        h = (u * np.uint64(0x9E3779B97F4A7C15) + np.uint64(self.cfg.seed * 7919 + 1)) & np.uint64(0xFFFFFFFF)
        return h.astype(np.float64) / 2**32 < self.cfg.replay_fraction

    def current_rows(self, shard: int) -> np.ndarray:
        """Rows of a shard's index holding a user's current sequence (False where a later generation supersedes it)."""
        return self._current[shard]

    def _trainable(self, index: np.ndarray) -> np.ndarray:
        """Events per user that train: the training split, plus the validation split on a refit."""
        usable = index["n_train"].astype(np.int64)
        return usable + index["n_valid"].astype(np.int64) if self.cfg.include_valid else usable

    def _windows(self, index: np.ndarray, current: np.ndarray, latest: bool = True) -> np.ndarray:
        if self.cfg.split == "train":
            usable = self._trainable(index)
            n = np.where(usable >= 2, -(-(usable - 1) // self.cfg.max_len), 0)
            if self.cfg.focus_new:
                # New events come last in time, so held-out (valid/test) events are taken to be new
                # first; windows are cut from the end, so the first k cover the new training events.
                held_out = (index["n_events"] - index["n_train"]).astype(np.int64)
                new_train = np.clip(index["n_new"].astype(np.int64) - held_out, 0, np.maximum(usable - 1, 0))
                new_windows = -(-new_train // self.cfg.max_len) if latest else np.zeros_like(n)
                n = np.where(self.replayed(index["uidx"]), n, np.minimum(n, new_windows))
        else:
            before, n = self._held_out_span(index)
            # A user's very first event has no history to predict it from (time splits): skipped.
            n = n - ((before == 0) & (n > 0))
        return np.where(current, n, 0)

    def _held_out_span(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(events before the split's first held-out event, held-out events) per index row."""
        n_train, n_valid = index["n_train"].astype(np.int64), index["n_valid"].astype(np.int64)
        if self.cfg.split == "valid":
            return n_train, n_valid
        return n_train + n_valid, index["n_events"].astype(np.int64) - n_train - n_valid

    @property
    def epoch(self) -> int:
        return int(self._position[0])

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._position[0] = epoch

    @property
    def skip_batches(self) -> int:
        """Batches of this epoch the rank already consumed (a resume skips them)."""
        return int(self._position[1])

    @skip_batches.setter
    def skip_batches(self, batches: int) -> None:
        self._position[1] = batches

    def share_position(self) -> None:
        """Keep the epoch and the batches to skip in shared memory, so that loader workers forked
        once (persistent, data_sharding.loader) read each new epoch's values."""
        self._position.share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def samples_per_slot(self, num_workers: int) -> int:
        slots = self.world_size * max(1, num_workers)
        return -(-self.num_samples // slots) if self.num_samples else 0

    def batches_per_worker(self, num_workers: int) -> int:
        return -(-self.samples_per_slot(num_workers) // self.cfg.batch_size)

    def epoch_order(self) -> EpochOrder:
        counts = np.array([c.sum() for c in self._counts], dtype=np.int64)
        return EpochOrder(self.cfg.seed, self.epoch, self.cfg.shuffle, self.cfg.batch_size, counts)

    def _slot_samples(self, slot: int, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, index row, window) of the samples slot ``slot`` yields this epoch, in order."""
        order = self.epoch_order()
        pool = order.pool(self.segments)
        if len(pool) == 0:
            return (np.empty(0, np.int64),) * 3
        positions = order.slot_positions(pool, slot, slots, len(self.segments))
        first = order.first
        shard_rank = np.searchsorted(first, positions, side="right") - 1
        shard_pos = order.shard_order[shard_rank]
        within = positions - first[shard_rank]
        rows = np.empty(len(within), np.int64)
        windows = np.empty(len(within), np.int64)
        for s in np.unique(shard_pos):
            sel = shard_pos == s
            starts = np.concatenate([[0], np.cumsum(self._counts[s])])
            row = np.searchsorted(starts, within[sel], side="right") - 1
            rows[sel] = row
            windows[sel] = within[sel] - starts[row]
        return shard_pos, rows, windows

    # -- reading --------------------------------------------------------------------------------
    def _load_shard(self, s: int) -> bytes:
        info = self.shards[s]
        try:
            data = storage.read_bytes(self.root, info.name)
        except OSError as e:
            raise ShardError(f"shard {info.name}: cannot read ({e.strerror or e})") from None
        if len(data) != info.bytes:
            raise ShardError(f"shard {info.name}: {len(data)} bytes, manifest says {info.bytes} (truncated?)")
        if self.cfg.verify and hashlib.sha256(data).hexdigest() != info.sha256:
            raise ShardError(f"shard {info.name}: sha256 mismatch (corrupt); run `bgpt inspect --verify`")
        return data

    def _window(self, data: bytes, s: int, row: int, w: int) -> tuple[int, np.ndarray, np.ndarray | None]:
        """(user, window, items seen before the held-out event: None for training windows)."""
        entry = self.indexes[s][row]
        uidx, events = shards.read_sample(data, int(entry["offset"]), self.shards[s].name)
        if uidx != entry["uidx"] or len(events) != entry["n_events"]:
            raise ShardError(f"shard {self.shards[s].name}: sample at byte {entry['offset']} disagrees with its index")
        length = self.cfg.max_len
        if self.cfg.split == "train":
            end = int(self._trainable(entry)) - w * length
            return uidx, events[max(0, end - length - 1) : end], None
        before, _ = self._held_out_span(entry)
        target = int(before) + w + int(before == 0)
        return uidx, events[max(0, target - length) : target + 1], events["item"][:target]

    def collate(
        self, users: list[int], windows: list[np.ndarray], seen: list[np.ndarray] | None = None
    ) -> dict[str, torch.Tensor]:
        train = self.cfg.split == "train"
        width = self.cfg.max_len + 1 if self.cfg.pad_to_max_len else None
        pack_width = (self.cfg.pack_width or self.cfg.max_len + 1) if self.cfg.pack and train else None
        targets = None
        if self.cfg.focus_new and train:
            # Only the new events are targets, except for the replay sample's users (every event).
            replay = self.replayed(np.array(users))
            targets = [(w["new"] == 1) | r for w, r in zip(windows, replay, strict=True)]
        return collate_windows(
            users, windows, width, None if train else seen, pack_width, targets, self.cfg.pack_row_multiple
        )

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader restarts its round-robin at worker 0; rotate roles so the first batch after a
        # resume comes from the worker whose turn it was.
        logical = (worker + self.skip_batches) % workers
        already = (self.skip_batches - logical + workers - 1) // workers
        yield from self.slot_batches(self.rank * workers + logical, self.world_size * workers, already)

    def slot_batches(self, slot: int, slots: int, skip: int = 0):
        """Collated batches of slot ``slot`` of ``slots`` this epoch, after its first ``skip`` (no worker lookup)."""
        if self.num_samples == 0:
            return
        shard_pos, rows, windows = self._slot_samples(slot, slots)
        size, loaded_shard, data = self.cfg.batch_size, -1, b""
        for start in range(skip * size, len(rows), size):
            picked = []  # (user, window, items seen before it) per sample
            chunk = slice(start, start + size)
            for s, r, w in zip(shard_pos[chunk], rows[chunk], windows[chunk], strict=True):
                if s != loaded_shard:
                    loaded_shard, data = int(s), self._load_shard(int(s))
                picked.append(self._window(data, int(s), int(r), int(w)))
            users, cut, seen = map(list, zip(*picked, strict=True))
            yield self.collate(users, cut, seen)


def iter_sequences(root: str | Path, generations: str | int = "state", until_generation: int | None = None):
    """(user index, events) of every user, shard by shard: each user's latest sequence by default
    (as the dataset stood after ``until_generation``, when given)."""
    for uidx, events, _ in iter_sequences_with_generation(root, generations, until_generation):
        yield uidx, events


def iter_sequences_with_generation(root: str | Path, generations: str | int = "state", until_generation=None):
    """(user index, events, generation whose shard holds them): in that generation's shards,
    ``new`` marks the events it added."""
    cfg = StreamConfig(generations=generations, shuffle=False, until_generation=until_generation)
    dataset = ShardDataset(root, cfg)
    for s, index in enumerate(dataset.indexes):
        current = dataset.current_rows(s)
        if not current.any():
            continue
        data = dataset._load_shard(s)
        for row in np.flatnonzero(current):
            uidx, events = shards.read_sample(data, int(index[row]["offset"]), dataset.shards[s].name)
            yield uidx, events, dataset.shards[s].generation
