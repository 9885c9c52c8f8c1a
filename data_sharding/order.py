"""The epoch's sample order: which samples each loader slot reads, and in what order.

An epoch puts the shards in a (seed, epoch)-seeded order and concatenates their samples into one
global list of N samples. The S = world_size x num_workers slots take contiguous runs of it (so
each reads only a few shards, sequentially), every slot exactly ceil(N / S) samples: a slot whose
run is one short wraps to the next sample. Within a slot, samples are shuffled shard by shard.

Elastic resume: a checkpoint records how many batches each rank consumed (the same on every rank)
and the topology (world size, workers) that consumed them. Resumed on another topology, the
samples no slot has read yet (in the old slots' order) form the *pool* the new slots share in the
same way; the next epoch starts afresh with the new topology. So no sample is skipped or read
twice in the epoch, beyond the at most one wrapped sample per slot that evens out the slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


def rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([abs(int(k)) for k in keys])


@dataclass(frozen=True)
class Segment:
    """A stretch of an epoch read by one topology: ``world_size`` ranks x ``num_workers`` loader
    workers (0: in the rank's process), each rank having consumed ``batches`` batches."""

    world_size: int
    num_workers: int
    batches: int


@dataclass(frozen=True)
class EpochOrder:
    """The sample order of one epoch over shards holding ``counts`` samples each."""

    seed: int
    epoch: int
    shuffle: bool
    batch_size: int
    counts: np.ndarray
    """(shards,) samples per shard, in the dataset's shard order."""

    @cached_property
    def shard_order(self) -> np.ndarray:
        """The shards' order in this epoch's global sample list."""
        if not self.shuffle:
            return np.arange(len(self.counts))
        return rng(self.seed, self.epoch).permutation(len(self.counts))

    @cached_property
    def first(self) -> np.ndarray:
        """(shards + 1,) start of each shard's run in the global list (in the epoch's order)."""
        return np.concatenate([[0], np.cumsum(np.asarray(self.counts, np.int64)[self.shard_order])])

    def slot_positions(self, pool: np.ndarray, slot: int, slots: int, segment: int = 0) -> np.ndarray:
        """Global positions slot ``slot`` of ``slots`` reads from ``pool`` (the positions left to
        read this epoch): a contiguous run, wrapped to the common quota, shuffled within each
        shard's part so that every shard is read once."""
        quota = -(-len(pool) // slots)
        positions = pool[(slot * len(pool) // slots + np.arange(quota)) % len(pool)]
        if self.shuffle:
            keys = (self.seed, self.epoch, slot, 1) + ((segment,) if segment else ())
            noise = rng(*keys).random(len(positions))
            positions = positions[np.lexsort((noise, np.searchsorted(self.first, positions, side="right")))]
        return positions

    def pool(self, segments: list[Segment]) -> np.ndarray:
        """Global positions not read yet: all of them, or what the ``segments`` (earlier
        topologies of this epoch) left, in their slots' order."""
        pool = np.arange(self.first[-1])
        for k, segment in enumerate(segments):
            workers = max(1, segment.num_workers)
            slots = segment.world_size * workers
            read, left = [], []
            for slot in range(slots):
                # A rank's workers are served round-robin: logical worker w gave every W-th batch.
                batches = max(0, -(-(segment.batches - slot % workers) // workers))
                positions = self.slot_positions(pool, slot, slots, k)
                read.append(positions[: batches * self.batch_size])
                left.append(positions[batches * self.batch_size :])
            rest = np.concatenate(left)
            rest = rest[~np.isin(rest, np.concatenate(read))]
            _, once = np.unique(rest, return_index=True)  # a wrapped duplicate stays once
            pool = rest[np.sort(once)]
        return pool
