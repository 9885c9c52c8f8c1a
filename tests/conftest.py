"""Shared fixtures: small synthetic logs and datasets the project generates itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_sharding.ingest import InputConfig
from data_sharding.pipeline import ShardConfig, build
from data_sharding.synth import SynthConfig, generate


def write_lines(path: Path, lines: list[str] | bytes) -> Path:
    """Write a raw text file (or bytes) for a test input."""
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("\n".join(lines) + "\n")
    return path


def shard(inputs: list[Path], out: Path, **kwargs) -> dict:
    """Run the shard pipeline with test-friendly defaults."""
    input_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in InputConfig.__dataclass_fields__}
    cfg = ShardConfig(out=str(out), input=InputConfig(paths=[str(p) for p in inputs], **input_kwargs), **kwargs)
    return build(cfg)


@pytest.fixture(scope="session")
def synth_log(tmp_path_factory) -> tuple[Path, Path]:
    """(events.csv, items.csv): 30k events, 600 users, 400 items."""
    root = tmp_path_factory.mktemp("synth")
    events, items = root / "events.csv", root / "items.csv"
    generate(SynthConfig(events=30_000, users=600, items=400, seed=7), events, items)
    return events, items


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, synth_log) -> Path:
    """A sharded dataset of the synthetic log: 8 shards, leave-one-out split."""
    out = tmp_path_factory.mktemp("ds") / "data"
    events, items = synth_log
    shard([events], out, items=str(items), events_per_shard=4_000)
    return out
