"""The Hugging Face adapter: the same windows as the native loader, however datasets splits the slots."""

import sys
from collections import Counter

import datasets
import pytest
import torch
from conftest import shard
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader

from data_sharding.hf import to_iterable_dataset
from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig
from data_sharding.synth import SynthConfig, generate

SLOTS = 4


@pytest.fixture(autouse=True)
def _private_hf_cache(tmp_path, monkeypatch):
    """Even a streaming from_generator dataset leaves a lock file in the datasets cache: keep it out of ~."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small sharded synthetic log (several shards) and a train config whose sample count does
    not divide by SLOTS, so the native slots wrap (repeat) samples the adapter must repeat too."""
    root = tmp_path_factory.mktemp("hf")
    events, items = root / "events.csv", root / "items.csv"
    generate(SynthConfig(events=3_000, users=90, items=60, seed=11), events, items)
    shard([events], root / "data", items=str(items), events_per_shard=500)
    max_len = next(m for m in range(4, 40) if ShardDataset(root / "data", StreamConfig(max_len=m)).num_samples % SLOTS)
    return root / "data", StreamConfig(max_len=max_len, batch_size=16, seed=4, shuffle=True)


def window(user, items, times, seen=None):
    """A window's identity: user, items and timestamps (plus, held out, the items seen before it)."""
    key = (int(user), tuple(int(i) for i in items), tuple(int(t) for t in times))
    return key if seen is None else (*key, tuple(int(i) for i in seen if i))


def batch_windows(b):
    n = b["mask"].sum(1).tolist()
    seen = b["seen"] if "seen" in b else [None] * len(n)
    return [window(b["users"][i], b["items"][i, :k], b["times"][i, :k], seen[i]) for i, k in enumerate(n)]


def native(root, cfg, world=1, workers=0):
    """Multiset of windows one epoch of the native loader yields over all ranks."""
    found = Counter()
    for rank in range(world):
        for b in StreamLoader(ShardDataset(root, cfg, rank, world), num_workers=workers):
            found.update(batch_windows(b))
    return found


def examples(ds):
    return Counter(window(ex["user"], ex["items"], ex["times"], ex.get("seen")) for ex in ds)


def test_one_slot_yields_the_native_windows_in_the_native_order(small):
    root, cfg = small
    order = [window(ex["user"], ex["items"], ex["times"]) for ex in to_iterable_dataset(root, cfg, num_slots=1)]
    assert order == [w for b in StreamLoader(ShardDataset(root, cfg)) for w in batch_windows(b)]


def test_all_slots_equal_the_native_loader_with_as_many_slots(small):
    root, cfg = small
    ds = to_iterable_dataset(root, cfg, num_slots=SLOTS)
    assert ds.num_shards == SLOTS
    expected = native(root, cfg, world=SLOTS)
    assert examples(ds) == expected
    assert sum(expected.values()) > ShardDataset(root, cfg).num_samples == len(expected)  # the wrap repeats


def test_dataloader_workers_split_the_slots_without_loss_or_repeats(small):
    root, cfg = small
    ds = to_iterable_dataset(root, cfg, num_slots=SLOTS)
    got = examples(DataLoader(ds, num_workers=2, batch_size=None))
    assert got == native(root, cfg, world=2, workers=2)


def test_split_dataset_by_node_gives_each_rank_its_slots(small):
    root, cfg = small
    ds = to_iterable_dataset(root, cfg, num_slots=SLOTS)
    per_rank = [examples(split_dataset_by_node(ds, rank, 2)) for rank in range(2)]
    assert per_rank[0].total() == per_rank[1].total()  # equal work per rank: no hang at epoch end
    assert per_rank[0] + per_rank[1] == native(root, cfg, world=2, workers=2)
    # Ranks and their loader workers together: every one of the 2 x 2 readers gets one slot.
    both = Counter()
    for rank in range(2):
        both += examples(DataLoader(split_dataset_by_node(ds, rank, 2), num_workers=2, batch_size=None))
    assert both == native(root, cfg, world=2, workers=2)


def test_slots_not_divisible_by_world_size_fall_back_to_every_rank_reading_all(small):
    # datasets' "auto" strategy: 3 shards over 2 ranks keeps every second example on each rank.
    root, cfg = small
    ds = to_iterable_dataset(root, cfg, num_slots=3)
    per_rank = [examples(split_dataset_by_node(ds, rank, 2)) for rank in range(2)]
    assert abs(per_rank[0].total() - per_rank[1].total()) <= 1
    assert per_rank[0] + per_rank[1] == native(root, cfg, world=3)


def test_valid_examples_carry_the_items_seen_before_the_held_out_event(small):
    root, cfg = small
    valid = StreamConfig(max_len=cfg.max_len, batch_size=16, seed=4, split="valid")
    ds = to_iterable_dataset(root, valid, num_slots=2)
    assert "seen" in ds.features and "seen" not in to_iterable_dataset(root, cfg, num_slots=2).features
    got = examples(ds)
    assert got == native(root, valid, world=2)
    assert all(len(key[3]) >= len(key[1]) - 1 > 0 for key in got)  # the history holds the window's inputs


def test_torch_format_dtypes(small):
    root, cfg = small
    ex = next(iter(to_iterable_dataset(root, StreamConfig(max_len=cfg.max_len, split="test")).with_format("torch")))
    dtypes = {name: value.dtype for name, value in ex.items()}
    assert dtypes == {
        "user": torch.int64,
        "items": torch.int64,
        "types": torch.int64,
        "times": torch.int64,
        "values": torch.float32,
        "has_value": torch.bool,
        "new": torch.bool,
        "targets": torch.bool,
        "seen": torch.int64,
    }
    assert ex["user"].ndim == 0 and ex["items"].shape == ex["targets"].shape == ex["values"].shape


def test_slot_batches_skip_resumes_inside_a_slot(small):
    root, cfg = small
    dataset = ShardDataset(root, cfg)
    full = [b["users"].tolist() for b in dataset.slot_batches(1, SLOTS)]
    assert [b["users"].tolist() for b in dataset.slot_batches(1, SLOTS, skip=2)] == full[2:]


def test_a_missing_datasets_library_says_how_to_install_it(small, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        to_iterable_dataset(small[0])
