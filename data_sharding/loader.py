"""The rank's batch iterator: a DataLoader over a ShardDataset with a resumable position.

Position = (epoch, batches consumed on this rank), the topology that reached it, and the earlier
segments of the epoch after an elastic resume (data_sharding.order). Loader workers leave the
stop signals (SIGUSR1, SIGTERM) to their rank, so a Slurm signal to every process of a job step
makes the rank checkpoint instead of a worker dying under it.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import signal
import threading
import weakref

import torch
from torch.utils.data import DataLoader

from data_sharding.errors import DataError
from data_sharding.order import Segment
from data_sharding.stream import ShardDataset

STOP_SIGNALS = {signal.SIGUSR1, signal.SIGTERM}


def _close_at_exit(ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()


def _leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """Loader workers leave stop signals to their rank. Slurm signals every process of a job step,
    and a dead worker (even one that exited 0) makes the rank's next fetch raise before the rank
    reaches its checkpoint. So a worker ignores SIGUSR1 and its first SIGTERM; a second SIGTERM
    (how the loader and Python's exit end a worker that does not stop by itself) ends it. The
    worker starts with both signals blocked (StreamLoader forks it so): one that arrived before
    these handlers is delivered now, to them."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *a: signal.signal(signal.SIGTERM, lambda *b: os._exit(0)))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


@contextlib.contextmanager
def _stop_signals_blocked(block: bool):
    """Start loader workers with the stop signals blocked: a worker forked while Slurm signals the
    job step would otherwise die of a SIGTERM before its handlers exist (seen: a requeue test's
    rank crashed at an epoch's new workers). The rank gets a signal sent meanwhile on unblocking."""
    if not block or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class StreamLoader:
    """The rank's batch iterator with a resumable position (epoch, batches consumed)."""

    def __init__(
        self,
        dataset: ShardDataset,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        pin_memory: bool = False,
        persistent_workers: bool = True,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        """Page-locked batches (GPU training): host-to-device copies can then overlap compute."""
        self.persistent_workers = persistent_workers and num_workers > 0
        """Workers forked once and kept from epoch to epoch (they read each epoch's position from
        the dataset's shared memory); not for the epoch an elastic resume continues, whose order
        depends on the earlier topologies' segments: that epoch gets workers of its own."""
        self._persistent: DataLoader | None = None
        self.epoch = 0
        self.batches = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.dataset.batches_per_worker(self.num_workers) * max(1, self.num_workers)

    def __iter__(self):
        self.dataset.set_epoch(self.epoch)
        self.dataset.skip_batches = self.batches
        loader = self._loader(persistent=self.persistent_workers and not self.dataset.segments)
        with _stop_signals_blocked(self.num_workers > 0):
            batches = iter(loader)  # forks the workers (a persistent loader: the first time only)
        for batch in batches:
            self.batches += 1
            yield batch
        self.epoch += 1
        self.batches = 0
        self.dataset.segments = []

    def _loader(self, persistent: bool) -> DataLoader:
        if persistent and self._persistent is not None:
            return self._persistent
        # A private generator: creating a DataLoader iterator draws a worker base seed, and from the
        # global RNG that draw would shift dropout masks after a resume (which starts a new iterator).
        generator = torch.Generator().manual_seed(self.dataset.cfg.seed * 1_000_003 + self.epoch)
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            generator=generator,
            pin_memory=self.pin_memory,
            worker_init_fn=_leave_stop_signals_to_the_rank if self.num_workers else None,
            persistent_workers=persistent,
        )
        if persistent:
            self.dataset.share_position()  # before the workers fork
            self._persistent = loader
            # Before multiprocessing's own exit hook (registered earlier, so run later), which would
            # join workers that ignore its single SIGTERM (_leave_stop_signals_to_the_rank).
            atexit.register(_close_at_exit, weakref.ref(self))
        return loader

    def close(self) -> None:
        """End the persistent workers (each leaves its loop and exits); a later epoch forks anew."""
        loader, self._persistent = self._persistent, None
        if loader is not None and loader._iterator is not None:
            loader._iterator._shutdown_workers()
            loader._iterator = None

    def state_dict(self) -> dict:
        """The position, the topology that reached it and, after an elastic resume within this
        epoch, the segments read before (every rank's position is the same: ranks step together)."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "seed": self.dataset.cfg.seed,
            "world_size": self.dataset.world_size,
            "num_workers": self.num_workers,
            "num_samples": self.dataset.num_samples,
            "segments": [dataclasses.astuple(s) for s in self.dataset.segments],
        }

    def load_state_dict(self, state: dict) -> bool:
        """Continue from ``state``. With another world size or worker count (an elastic resume) the
        rest of the epoch, exactly the samples no rank read yet, is shared out anew; from the next
        epoch on the order is this topology's own. Returns True for an elastic resume."""
        for key in ("seed", "num_samples"):
            if state[key] != self.state_dict()[key]:
                raise DataError(
                    f"cannot resume the data stream: {key} was {state[key]}, now {self.state_dict()[key]} "
                    f"(a changed seed or dataset cannot continue the same sample order)"
                )
        segments = [Segment(*s) for s in state.get("segments", [])]
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        same = (state["world_size"], state["num_workers"]) == (self.dataset.world_size, self.num_workers)
        if not same:
            segments.append(Segment(state["world_size"], state["num_workers"], self.batches))
            self.batches = 0
        self.dataset.segments = segments
        return not same
