"""Datasets read through fsspec URLs stream exactly what the local folder streams."""

import json

import fsspec
import pytest
import torch
from conftest import shard, tiny_config

from data_sharding import shards
from data_sharding.errors import DataError, ShardError
from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig
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


def logged_losses(run):
    return [
        (r["step"], r["loss"], r["lr"]) for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
    ]


def test_training_from_a_url_matches_training_from_the_folder(tmp_path, cyclic_data):
    """Same config and seed: the URL run sees the same batches, so its losses and test metrics are the folder run's."""
    quiet = {"log": lambda *a: None}
    local = train_run(tmp_path / "local", tiny_config(cyclic_data, max_steps=10), **quiet)
    remote = train_run(tmp_path / "url", tiny_config(f"file://{cyclic_data}", max_steps=10), **quiet)
    assert (tmp_path / "url" / "data_manifest.json").exists()
    assert len(logged_losses(tmp_path / "local")) == 2  # log_every=5 over 10 steps
    assert logged_losses(tmp_path / "url") == logged_losses(tmp_path / "local")
    assert local["count"] > 0
    where = {"run", "train"}  # the run folder; the training state (with its wall clock) is compared below
    assert {k: v for k, v in remote.items() if k not in where} == {k: v for k, v in local.items() if k not in where}
    timing = {"seconds", "wall_seconds_this_process"}
    assert {k: v for k, v in remote["train"].items() if k not in timing} == {
        k: v for k, v in local["train"].items() if k not in timing
    }
    assert remote["train"]["step"] == 10


def test_shard_reads_its_inputs_from_urls(tmp_path, synth_log):
    """Events and items behind URLs (fsspec's in-memory backend: no local path) shard to the same bytes."""
    events, items = synth_log
    fs = fsspec.filesystem("memory")
    fs.pipe("/raw/events.csv", events.read_bytes())
    fs.pipe("/raw/items.csv", items.read_bytes())
    local = shard([events], tmp_path / "local", items=str(items), events_per_shard=4_000)
    remote = shard(
        ["memory://raw/events.csv"], tmp_path / "remote", items="memory://raw/items.csv", events_per_shard=4_000
    )
    assert [s["sha256"] for s in remote["generations"][0]["shards"]] == [
        s["sha256"] for s in local["generations"][0]["shards"]
    ]
    source = remote["generations"][0]["sources"][0]
    assert source["path"] == "memory://raw/events.csv"
    assert source["sha256"] == local["generations"][0]["sources"][0]["sha256"]
    assert not (tmp_path / "remote" / ".g0001.tmp").exists()  # the fetched copy went with the work folder
    with pytest.raises(DataError, match="memory://raw/missing.csv: no such file"):
        shard(["memory://raw/missing.csv"], tmp_path / "missing")
