"""The streaming loader: exact partitioning across ranks and workers, exact resume, clear errors."""

import itertools
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from data_sharding.errors import DataError, ShardError
from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig


def sample_ids(batch):
    """(user, last timestamp) identifies a window."""
    last = batch["mask"].sum(1) - 1
    return list(zip(batch["users"].tolist(), batch["times"].gather(1, last[:, None]).squeeze(1).tolist(), strict=True))


def run_epoch(root, cfg, rank, world, workers):
    loader = StreamLoader(ShardDataset(root, cfg, rank, world), num_workers=workers)
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


def test_every_sample_exactly_once_per_epoch_across_2_ranks_x_2_workers(dataset):
    # A window length for which the sample count divides evenly over the 4 slots.
    max_len = next(m for m in range(10, 60) if ShardDataset(dataset, StreamConfig(max_len=m)).num_samples % 4 == 0)
    cfg = StreamConfig(batch_size=16, max_len=max_len, seed=3)
    seen = Counter()
    per_rank = []
    for rank in range(2):
        batches = run_epoch(dataset, cfg, rank, 2, 2)
        per_rank.append(len(batches))
        for b in batches:
            seen.update(sample_ids(b))
    assert per_rank[0] == per_rank[1] > 0
    assert len(seen) == ShardDataset(dataset, cfg).num_samples
    assert set(seen.values()) == {1}


def test_uneven_sample_counts_repeat_at_most_one_sample_per_slot(dataset):
    max_len = next(m for m in range(10, 60) if ShardDataset(dataset, StreamConfig(max_len=m)).num_samples % 4 == 3)
    cfg = StreamConfig(batch_size=16, max_len=max_len)
    seen = Counter()
    for rank in range(2):
        for b in run_epoch(dataset, cfg, rank, 2, 2):
            seen.update(sample_ids(b))
    assert len(seen) == ShardDataset(dataset, cfg).num_samples  # nothing lost
    assert sum(c - 1 for c in seen.values()) == 1  # one repeat evens out the four slots


def test_epochs_are_shuffled_differently_but_reproducibly(dataset):
    cfg = StreamConfig(batch_size=32, max_len=20, seed=1)

    def order(epoch):
        loader = StreamLoader(ShardDataset(dataset, cfg))
        loader.epoch = epoch
        return [sample_ids(b) for b in loader]

    assert order(0) == order(0)
    assert order(0) != order(1)


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_with_the_uninterrupted_order(dataset, workers):
    cfg = StreamConfig(batch_size=8, max_len=20, seed=5)
    full = [sample_ids(b) for b in StreamLoader(ShardDataset(dataset, cfg, 1, 2), num_workers=workers)]
    interrupted = StreamLoader(ShardDataset(dataset, cfg, 1, 2), num_workers=workers)
    head = [sample_ids(b) for b in itertools.islice(iter(interrupted), 7)]
    state = interrupted.state_dict()
    resumed = StreamLoader(ShardDataset(dataset, cfg, 1, 2), num_workers=workers)
    resumed.load_state_dict(state)
    tail = [sample_ids(b) for b in resumed]
    assert state["batches"] == 7
    assert head + tail == full
    assert resumed.epoch == 1 and resumed.batches == 0


def _workers_ready(loader_iter) -> list:
    """The loader's worker processes, once each has installed its signal handlers."""
    deadline = time.time() + 30
    while time.time() < deadline:
        workers = multiprocessing.active_children()
        masks = [Path(f"/proc/{w.pid}/status").read_text() for w in workers]
        caught = [int(line.split()[1], 16) for m in masks for line in m.splitlines() if line.startswith("SigCgt")]
        if len(workers) == 2 and all(c & (1 << (signal.SIGTERM - 1)) for c in caught):
            return workers
        time.sleep(0.05)
    raise TimeoutError("loader workers never installed their handlers")


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_loader_workers_keep_serving_through_a_stop_signal(dataset, sig):
    # Slurm signals every process of a job step; a worker that died made the rank's next fetch
    # raise before the rank could checkpoint. The workers leave the signal to the rank.
    cfg = StreamConfig(batch_size=8, max_len=20, seed=5)
    expected = [sample_ids(b) for b in StreamLoader(ShardDataset(dataset, cfg), num_workers=2)]
    loader = iter(StreamLoader(ShardDataset(dataset, cfg), num_workers=2))
    got = [sample_ids(next(loader))]
    workers = _workers_ready(loader)
    for worker in workers:
        os.kill(worker.pid, sig)
    got += [sample_ids(b) for b in loader]
    assert got == expected
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0  # ended by the loader at the end of the epoch


STOP_MID_EPOCH = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
from test_stream import _workers_ready
from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig
loader = iter(StreamLoader(ShardDataset(sys.argv[1], StreamConfig(batch_size=8, max_len=20)), num_workers=2))
next(loader)
for worker in _workers_ready(loader):
    os.kill(worker.pid, signal.SIGTERM)  # what Slurm sends every process of the step
next(loader)
sys.exit(0)  # the rank stops mid-epoch, its workers still running
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_rank_that_stops_mid_epoch_after_a_sigterm_exits_without_waiting_on_its_workers(dataset):
    done = subprocess.run(
        [sys.executable, "-c", STOP_MID_EPOCH, str(dataset), str(Path(__file__).parent)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]


def test_uneven_shards_still_give_every_rank_the_same_number_of_batches(dataset):
    cfg = StreamConfig(batch_size=7, max_len=10)
    counts = [len(run_epoch(dataset, cfg, rank, 3, 1)) for rank in range(3)]
    assert len(set(counts)) == 1 and counts[0] > 0


def test_training_windows_cover_every_training_target_once(dataset):
    cfg = StreamConfig(batch_size=64, max_len=10, shuffle=False)
    ds = ShardDataset(dataset, cfg)
    targets = 0
    for b in StreamLoader(ds):
        targets += int((b["mask"].sum(1) - 1).sum())
        assert b["items"].shape[1] <= 11
    expected = sum(int((i["n_train"][i["n_train"] >= 2] - 1).sum()) for i in ds.indexes)
    assert targets == expected


def test_a_refit_trains_on_each_users_validation_event_too(dataset):
    def last_events(cfg):
        """user -> (item, timestamp) of the latest target in that user's windows."""
        latest = {}
        for b in StreamLoader(ShardDataset(dataset, cfg)):
            last = (b["mask"].sum(1) - 1)[:, None]
            for u, item, ts in zip(
                b["users"].tolist(),
                b["items"].gather(1, last)[:, 0].tolist(),
                b["times"].gather(1, last)[:, 0].tolist(),
                strict=True,
            ):
                latest[u] = max(latest.get(u, (0, -1)), (item, ts), key=lambda e: e[1])
        return latest

    ds = ShardDataset(dataset, StreamConfig(max_len=10, include_valid=True, shuffle=False))
    targets = sum(int((b["mask"].sum(1) - 1).sum()) for b in StreamLoader(ds))
    trainable = [i["n_train"].astype(int) + i["n_valid"].astype(int) for i in ds.indexes]
    assert targets == sum(int((n[n >= 2] - 1).sum()) for n in trainable)
    refit = last_events(StreamConfig(max_len=10, include_valid=True, shuffle=False))
    valid = last_events(StreamConfig(max_len=10, split="valid", shuffle=False))
    assert valid and all(refit[u] == valid[u] for u in valid)  # the held-out valid event is now a target
    with pytest.raises(DataError, match="focus_new"):
        StreamConfig(include_valid=True, focus_new=True)


def test_eval_samples_end_at_the_held_out_event(dataset):
    ds = ShardDataset(dataset, StreamConfig(batch_size=16, max_len=5, split="test", shuffle=False))
    batch = next(iter(StreamLoader(ds)))
    assert batch["items"].shape[1] <= 6
    assert ds.num_samples == sum(int((i["n_events"] >= 3).sum()) for i in ds.indexes)
    assert batch["mask"][:, 0].all()
    assert batch["values"].dtype == torch.float32


def test_a_corrupt_shard_is_named(tmp_path, dataset):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    ds = ShardDataset(copy, StreamConfig(batch_size=4, shuffle=False))
    name = ds.shards[0].name
    with open(copy / name, "r+b") as f:
        f.seek(700)
        f.write(b"\xff\xff")
    with pytest.raises(ShardError, match=f"shard {name}: sha256 mismatch"):
        list(StreamLoader(ds))
    (copy / name).write_bytes(b"truncated")
    with pytest.raises(ShardError, match=f"shard {name}: 9 bytes"):
        list(StreamLoader(ShardDataset(copy, StreamConfig(batch_size=4, shuffle=False))))


WORKER_SIGNALLED_AT_START = """
import os, signal, sys, time
from torch.utils.data import DataLoader
from data_sharding.loader import _leave_stop_signals_to_the_rank, _stop_signals_blocked
from data_sharding.stream import ShardDataset, StreamConfig

def slow_start(worker_id):  # the window between the fork and the worker's own handlers, widened
    open(sys.argv[3], "w").close()  # torch's worker handlers are in place by now
    time.sleep(0.5)
    _leave_stop_signals_to_the_rank(worker_id)

signal.signal(signal.SIGTERM, lambda *a: None)  # the rank itself handles its stop signals
loader = DataLoader(ShardDataset(sys.argv[1], StreamConfig(batch_size=16)), batch_size=None,
                    num_workers=1, worker_init_fn=slow_start)
with _stop_signals_blocked(sys.argv[2] == "blocked"):
    batches = iter(loader)
while not os.path.exists(sys.argv[3]):  # a TERM before that would meet the rank's inherited handler
    time.sleep(0.01)
os.kill(batches._workers[0].pid, signal.SIGTERM)  # Slurm signals every process of the step
print(sum(1 for _ in batches))
"""


@pytest.mark.parametrize("mask", ["blocked", "unblocked"])
def test_a_worker_signalled_before_its_handlers_exist_survives_only_when_forked_with_the_signals_blocked(
    dataset, mask, tmp_path
):
    done = subprocess.run(
        [sys.executable, "-c", WORKER_SIGNALLED_AT_START, str(dataset), mask, str(tmp_path / "started")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    if mask == "blocked":  # what StreamLoader does: the TERM waits for the handlers, which ignore it
        assert done.returncode == 0 and int(done.stdout) > 0, done.stderr[-2000:]
    else:  # the race this guards against: the worker dies of the TERM, the rank's fetch raises
        assert done.returncode != 0 and "DataLoader worker" in done.stderr


def test_persistent_workers_are_forked_once_and_read_each_epochs_order(dataset):
    cfg = StreamConfig(batch_size=16, max_len=20, seed=4)
    kept = StreamLoader(ShardDataset(dataset, cfg, 0, 2), num_workers=2)
    fresh = StreamLoader(ShardDataset(dataset, cfg, 0, 2), num_workers=2, persistent_workers=False)
    pids = []
    for epoch in range(3):
        assert [sample_ids(b) for b in kept] == [sample_ids(b) for b in fresh], epoch
        pids.append(sorted(w.pid for w in kept._persistent._iterator._workers))
    assert pids[0] == pids[1] == pids[2] and len(pids[0]) == 2
    # A resume mid-epoch into a loader whose workers already exist continues the same order.
    cut = StreamLoader(ShardDataset(dataset, cfg, 0, 2), num_workers=2)
    head = [sample_ids(b) for b in itertools.islice(iter(cut), 3)]
    cut.load_state_dict({**cut.state_dict(), "epoch": 3})  # (a later epoch, batch 3)
    kept.load_state_dict(cut.state_dict())
    fresh.load_state_dict(cut.state_dict())
    assert len(head) == 3 and [sample_ids(b) for b in kept] == [sample_ids(b) for b in fresh]


def test_a_process_with_persistent_workers_mid_epoch_exits_without_closing_them(dataset):
    """Python's exit ends persistent workers (they ignore the single SIGTERM multiprocessing's exit
    hook sends them, so StreamLoader closes them first); without that the process hangs at exit."""
    script = (
        "import itertools, sys\n"
        "from data_sharding.loader import StreamLoader\n"
        "from data_sharding.stream import ShardDataset, StreamConfig\n"
        "loader = StreamLoader(ShardDataset(sys.argv[1], StreamConfig(batch_size=4, max_len=20)), num_workers=2)\n"
        "print(len(list(itertools.islice(iter(loader), 3))))\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script, str(dataset)], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3"
