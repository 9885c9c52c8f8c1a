"""The streaming loader as a Hugging Face ``datasets.IterableDataset``, for code that expects one.

Each example is one window (one sample of :class:`~data_sharding.stream.ShardDataset`), unpadded:
``user`` (int64), ``items`` / ``types`` / ``times`` (int64 lists), ``values`` (float32 list, 0 where
the event has none), ``has_value`` / ``new`` / ``targets`` (bool lists, one per event), and for the
valid / test splits ``seen`` (int64 list: the items of the user's history before the held-out event).

The dataset's shards are the loader's *slots*: the epoch's sample list is cut into ``num_slots``
contiguous, equally long runs (see ``data_sharding.stream``), and ``datasets`` hands whole slots to
DataLoader workers and to ranks. So a split run reads each sample exactly as the native loader with
world_size x num_workers = num_slots slots does: nothing dropped, nothing repeated beyond the at most
one wrapped sample per slot that evens out the slot lengths. Choose ``num_slots`` as a multiple of
world_size x num_workers: ``split_dataset_by_node`` then gives each rank num_slots / world_size slots
(the same number of examples on every rank); otherwise ``datasets`` falls back to every rank reading
every slot and keeping one example in world_size. Workers beyond a rank's slot count stay idle.

Usage::

    from data_sharding.hf import to_iterable_dataset
    from data_sharding.stream import StreamConfig

    ds = to_iterable_dataset("data/", StreamConfig(max_len=50, seed=1), num_slots=8)
    for ex in ds:  # {"user": 17, "items": [...], "types": [...], ...}
        ...
    torch_ds = ds.with_format("torch")  # tensors instead of lists

    from torch.utils.data import DataLoader
    loader = DataLoader(torch_ds, batch_size=None, num_workers=4)  # 2 slots per worker

    from datasets.distributed import split_dataset_by_node
    rank_ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)  # num_slots / world_size slots each

The window order within a slot follows ``cfg.seed`` and ``epoch``; ``IterableDataset.set_epoch`` only
reorders whole slots, so pass ``epoch`` (a new dataset per epoch) for a different sample order.
Even streaming, ``datasets`` puts a lock file in its cache (HF_DATASETS_CACHE, by default under ~).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from data_sharding.errors import DataError
from data_sharding.stream import ShardDataset, StreamConfig
from data_sharding.vocab import PAD_ITEM

_INT_LISTS = ("items", "types", "times")
_BOOL_LISTS = ("has_value", "new", "targets")


def _features(split: str):
    """The explicit ``datasets.Features`` of one window example."""
    from datasets import Features, List, Value

    columns = {"user": Value("int64")}
    columns.update({name: List(Value("int64")) for name in _INT_LISTS})
    columns["values"] = List(Value("float32"))
    columns.update({name: List(Value("bool")) for name in _BOOL_LISTS})
    if split != "train":
        columns["seen"] = List(Value("int64"))
    return Features(columns)


def unbatch(batch: dict) -> Iterator[dict]:
    """The windows of a collated batch as examples: each cut to its real events (``mask``), and
    ``seen`` without its padding."""
    lengths = batch["mask"].sum(1).tolist()
    columns = {name: batch[name].numpy() for name in (*_INT_LISTS, "values", *_BOOL_LISTS)}
    users = batch["users"].tolist()
    seen = batch["seen"].numpy() if "seen" in batch else None
    for i, n in enumerate(lengths):
        example = {"user": users[i], **{name: col[i, :n].tolist() for name, col in columns.items()}}
        if seen is not None:
            example["seen"] = seen[i][seen[i] != PAD_ITEM].tolist()
        yield example


def _examples(root: str, cfg: StreamConfig, num_slots: int, epoch: int, slots: list[int]) -> Iterator[dict]:
    """The generator ``datasets`` calls with the slots this worker / rank owns (its shards)."""
    dataset = ShardDataset(root, cfg)
    dataset.set_epoch(epoch)
    for slot in slots:
        for batch in dataset.slot_batches(slot, num_slots):
            yield from unbatch(batch)


def to_iterable_dataset(root: str | Path, cfg: StreamConfig | None = None, num_slots: int = 8, epoch: int = 0):
    """A ``datasets.IterableDataset`` of the windows of ``cfg.split`` at ``root``, in ``num_slots``
    shards (the loader's slots; see the module docstring). ``cfg.batch_size`` only sets how many
    windows are read at a time; the examples are single windows."""
    try:
        from datasets import IterableDataset
    except ImportError:
        raise ImportError("data_sharding.hf needs the Hugging Face datasets library: pip install datasets") from None
    cfg = replace(cfg or StreamConfig(), pack=False)  # examples are single windows: never packed rows
    if num_slots < 1:
        raise DataError(f"num_slots must be >= 1, got {num_slots}")
    dataset = ShardDataset(root, cfg)  # a bad root or configuration fails here, not in a worker
    return IterableDataset.from_generator(
        _examples,
        features=_features(cfg.split),
        gen_kwargs={
            "root": str(dataset.root),
            "cfg": cfg,
            "num_slots": num_slots,
            "epoch": epoch,
            "slots": list(range(num_slots)),  # the one list: datasets shards over it
        },
    )
