"""Elastic resume of the data stream: a position reached by one topology (world size x loader
workers) continues on another, and the epoch still reads every sample once."""

from collections import Counter

import pytest

from data_sharding.loader import StreamLoader
from data_sharding.order import EpochOrder, Segment
from data_sharding.stream import ShardDataset, StreamConfig


def sample_ids(batch):
    """(user, last timestamp) identifies a window."""
    last = batch["mask"].sum(1) - 1
    return list(zip(batch["users"].tolist(), batch["times"].gather(1, last[:, None]).squeeze(1).tolist(), strict=True))


def loaders(root, cfg, world: int, workers: int) -> list[StreamLoader]:
    return [StreamLoader(ShardDataset(root, cfg, rank, world), num_workers=workers) for rank in range(world)]


def consume(ranks: list[StreamLoader], batches: int | None) -> tuple[list, list[dict]]:
    """Step every rank together for ``batches`` batches (None: to the epoch's end); (sample ids,
    each rank's state)."""
    ids, counts = [], []
    for loader in ranks:
        taken = 0
        for batch in loader:
            ids += sample_ids(batch)
            taken += 1
            if batches is not None and taken == batches:
                break
        counts.append(taken)
    assert len(set(counts)) == 1, f"ranks yielded different batch counts: {counts}"
    return ids, [loader.state_dict() for loader in ranks]


@pytest.fixture(scope="module")
def cfg(dataset):
    # A window length for which the sample count divides over 1, 2 and 4 slots: no wrapped sample.
    max_len = next(m for m in range(10, 60) if ShardDataset(dataset, StreamConfig(max_len=m)).num_samples % 4 == 0)
    return StreamConfig(batch_size=8, max_len=max_len, seed=5)


@pytest.mark.parametrize(
    "before, after",
    [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((2, 1), (1, 2)), ((1, 2), (2, 0))],
    ids=["2->1", "1->2", "2x1->1x2 workers", "1x2 workers->2"],
)
def test_an_epoch_resumed_on_another_topology_reads_every_sample_exactly_once(dataset, cfg, before, after):
    everything = Counter(i for loader in loaders(dataset, cfg, 1, 0) for b in loader for i in sample_ids(b))
    first, states = consume(loaders(dataset, cfg, *before), batches=7)
    resumed = loaders(dataset, cfg, *after)
    for loader in resumed:
        assert loader.load_state_dict(states[0]) is True  # every rank restores the same position
    rest, _ = consume(resumed, batches=None)
    assert not set(first) & set(rest)  # nothing read before the resume is read again
    assert Counter(first + rest) == everything  # and nothing is skipped


def test_two_topology_changes_in_one_epoch_still_cover_it_once(dataset, cfg):
    everything = Counter(i for loader in loaders(dataset, cfg, 1, 0) for b in loader for i in sample_ids(b))
    first, states = consume(loaders(dataset, cfg, 2, 0), batches=5)
    middle_ranks = loaders(dataset, cfg, 1, 0)
    middle_ranks[0].load_state_dict(states[0])
    middle, states = consume(middle_ranks, batches=6)
    assert states[0]["segments"] == [(2, 0, 5)]
    last_ranks = loaders(dataset, cfg, 4, 0)
    for loader in last_ranks:
        loader.load_state_dict(states[0])
    rest, _ = consume(last_ranks, batches=None)
    assert Counter(first + middle + rest) == everything


def test_after_an_elastic_epoch_the_next_epoch_is_the_new_topology_s_own(dataset, cfg):
    _, states = consume(loaders(dataset, cfg, 2, 0), batches=3)
    resumed = loaders(dataset, cfg, 1, 0)[0]
    resumed.load_state_dict(states[0])
    list(resumed)  # the rest of epoch 0
    assert resumed.epoch == 1 and resumed.dataset.segments == []
    fresh = loaders(dataset, cfg, 1, 0)[0]
    fresh.epoch = 1
    assert [sample_ids(b) for b in list(resumed)[:3]] == [sample_ids(b) for b in list(fresh)[:3]]


def test_the_same_topology_resumes_exactly_and_a_changed_dataset_is_refused(dataset, cfg):
    ranks = loaders(dataset, cfg, 2, 0)
    _, states = consume(ranks, batches=4)
    again = loaders(dataset, cfg, 2, 0)
    assert again[1].load_state_dict(states[1]) is False and again[1].batches == 4
    with pytest.raises(Exception, match="num_samples was"):
        again[0].load_state_dict({**states[0], "num_samples": states[0]["num_samples"] + 1})


def test_the_pool_left_by_a_segment_is_what_its_slots_did_not_read():
    order = EpochOrder(seed=1, epoch=0, shuffle=True, batch_size=2, counts=[5, 3, 4])
    # 2 ranks x 2 workers, 3 batches per rank: logical workers 0 and 1 gave 2 and 1 batches.
    read = set()
    for slot in range(4):
        batches = 2 if slot % 2 == 0 else 1
        read |= set(order.slot_positions(order.pool([]), slot, 4)[: 2 * batches].tolist())
    left = order.pool([Segment(world_size=2, num_workers=2, batches=3)])
    assert sorted(left.tolist() + sorted(read)) == list(range(12)) and not read & set(left.tolist())
