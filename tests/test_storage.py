"""Datasets read through fsspec URLs stream exactly what the local folder streams."""

import fsspec
import pytest
import torch
from conftest import tiny_config

from data_sharding import shards
from data_sharding.errors import ShardError
from data_sharding.stream import ShardDataset, StreamConfig, StreamLoader
from trainer.run import train_run


def batches(root, rank=1, world_size=2, **kwargs):
    cfg = StreamConfig(max_len=8, batch_size=16, **kwargs)
    return list(StreamLoader(ShardDataset(root, cfg, rank=rank, world_size=world_size)))


def same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def to_memory(dataset, name):
    """Copy a dataset into fsspec's in-memory file system: a backend with no local path at all."""
    fs = fsspec.filesystem("memory")
    for path in dataset.rglob("*"):
        if path.is_file():
            fs.pipe(f"/{name}/{path.relative_to(dataset)}", path.read_bytes())
    return f"memory://{name}"


def test_file_and_memory_urls_stream_the_same_batches_as_the_folder(dataset):
    local = batches(dataset)
    same(local, batches(f"file://{dataset}"))
    same(local, batches(to_memory(dataset, "ds1")))
    same(batches(dataset, split="test", shuffle=False), batches(to_memory(dataset, "ds2"), split="test", shuffle=False))


def test_a_corrupt_shard_behind_a_url_is_named(dataset):
    root = to_memory(dataset, "ds3")
    name = shards.load_manifest(dataset)["generations"][0]["shards"][0]["name"]
    fs = fsspec.filesystem("memory")
    data = bytearray(fs.cat(f"/ds3/{name}"))
    data[600] ^= 0xFF
    fs.pipe(f"/ds3/{name}", bytes(data))
    with pytest.raises(ShardError, match=f"shard {name}: sha256 mismatch"):
        batches(root, rank=0, world_size=1, shuffle=False)
    with pytest.raises(ShardError, match="no manifest.json"):
        shards.load_manifest("memory://nowhere")


def test_training_reads_its_data_from_a_url(tmp_path, cyclic_data):
    metrics = train_run(tmp_path / "run", tiny_config(f"file://{cyclic_data}", max_steps=10), log=lambda *a: None)
    assert metrics["count"] > 0 and (tmp_path / "run" / "data_manifest.json").exists()
