"""Distributed evaluation: which batches a process scores (``Part``) and how every process's
partial metrics (trainer.evaluate.RankingMetrics, by name) merge into one process's."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """This process's share of an evaluation: the batches ``rank``, ``rank + world``, ... of the
    one fixed batch order. ``gather`` (accelerate.utils.gather_object) collects every rank's
    partial metrics, and each rank merges them into the metrics of all batches: equal to one
    process's exactly, since every batch is scored as one process would and merged in its order."""

    rank: int = 0
    world: int = 1
    gather: Callable[[list], list] | None = None
    collective: bool = False
    """The model's forward is a collective (ZeRO-3 gathers each module's weights as it runs): every
    rank must run as many forwards as the others, so a rank without a batch in the last round
    scores one it read and does not count it."""

    def owns(self, batch_index: int) -> bool:
        return batch_index % self.world == self.rank

    def idles_last_round(self, batches_read: int) -> bool:
        """Whether this rank had no batch in the last round of ``batches_read`` batches."""
        if batches_read == 0:
            return False
        last_round = (batches_read - 1) // self.world * self.world
        return self.rank >= batches_read - last_round

    @classmethod
    def of(cls, accelerator, collective: bool = False) -> Part:
        """This process's share under ``accelerator`` (every batch when it is the only process)."""
        if accelerator.num_processes == 1:
            return cls()
        from accelerate.utils import gather_object

        return cls(accelerator.process_index, accelerator.num_processes, gather_object, collective)


WHOLE = Part()
"""Every batch, in this process (no other process to merge with)."""


def merge_parts(metrics: dict, part: Part) -> None:
    """Merge every other process's metrics of its batches into ``metrics`` (by name)."""
    if part.gather is not None:
        for rank, other in enumerate(part.gather([metrics])):  # one entry per rank, in rank order
            if rank != part.rank:
                for name, accumulated in metrics.items():
                    accumulated.merge(other[name])
