"""Incremental retraining on a new data generation: grown tables, new-event windows, lineage, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shard, write_lines

from data_sharding.stream import ShardDataset, StreamConfig
from trainer import checkpoint as ckpt
from trainer.checkpoint import grow_and_load
from trainer.config import build_config, load_run_config
from trainer.errors import ConfigError
from trainer.factory import build_model
from trainer.retrain import retrain
from trainer.run import train_run

QUIET = {"log": lambda *a: None}


def events(users: range, items: int, start: int, steps: int, new_items: int = 0) -> list[str]:
    rows = []
    for u in users:
        for t in range(steps):
            item = (u + t) % items if not new_items or t % 3 else items + (u + t) % new_items
            rows.append(f"u{u},i{item},{start + 60 * (u * 100 + t)},view")
    return rows


@pytest.fixture()
def generations(tmp_path):
    """Generation 1: 40 users x 8 events over 12 items. Generation 2: 20 of them come back with
    6 more events each (some on 3 new items) and 5 new users arrive."""
    head = ["user,item,ts,event_type"]
    first = write_lines(tmp_path / "g1.csv", head + events(range(40), 12, 1_600_000_000, 8))
    second = write_lines(tmp_path / "g2.csv", head + events(range(20, 45), 12, 1_700_000_000, 6, new_items=3))
    data = tmp_path / "data"
    shard([first], data)
    return tmp_path, data, second


def tiny(data, **train):
    return build_config(
        {
            "data": {"path": str(data), "num_workers": 0},
            "model": {"backbone": "scratch", "hidden_size": 16, "num_heads": 2, "num_layers": 1, "dropout": 0.0},
            "train": {"micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "log_every": 5, **train},
            "heads": {"type_weight": 0.0, "time_weight": 0.1, "value_weight": 0.0},
            "checkpoint": {"every_steps": 0},
            "eval": {"ks": [1, 10]},
        }
    )


def test_retrain_grows_tables_trains_on_new_events_and_records_lineage(generations):
    root, data, second = generations
    parent = root / "parent"
    train_run(parent, tiny(data, max_steps=20), **QUIET)
    source = ckpt.latest_valid(parent)
    old = ckpt.load_weights(source)
    shard([second], data, append=True)

    # Growing: old rows bit for bit, new item rows the mean of the known items (no text here).
    cfg = load_run_config(parent)
    cfg.data.path = str(data)
    model, info = build_model(cfg.model, cfg.lora, cfg.heads, data)
    grown = grow_and_load(model, source, **QUIET)
    assert any(g.startswith("items.ids.weight 15 -> 18") for g in grown)
    table = model.items.ids.weight.detach()
    assert torch.equal(table[:15], old["items.ids.weight"])
    assert torch.equal(table[15], old["items.ids.weight"][3:].mean(dim=0))
    assert all(
        torch.equal(p.detach(), old[n]) for n, p in model.named_parameters() if n in old and n != "items.ids.weight"
    )

    out = root / "retrained"
    metrics = retrain(parent, data, out, {"train": {"max_steps": 6}, "data": {"replay_fraction": 0.0}}, **QUIET)
    assert metrics["count"] > 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["parent_run"] == str(parent.resolve())
    assert lineage["generation"] == 2 and lineage["parent_vocab_version"].startswith("g0001")
    assert lineage["chain"] == [{"run": str(parent.resolve()), "generation": 1}]
    saved = load_run_config(out)
    assert saved.data.focus_new and saved.train.init_from == str(source.resolve())
    assert ckpt.read_state(ckpt.latest_valid(out))["vocab_version"].startswith("g0002")
    # The parent run is untouched.
    assert torch.equal(ckpt.load_weights(ckpt.latest_valid(parent))["items.ids.weight"], old["items.ids.weight"])


def test_focus_new_windows_target_only_new_events_plus_the_replay_sample(generations):
    _, data, second = generations
    shard([second], data, append=True)
    focus = ShardDataset(data, StreamConfig(max_len=4, batch_size=4, focus_new=True))
    full = ShardDataset(data, StreamConfig(max_len=4, batch_size=4))
    every = ShardDataset(data, StreamConfig(max_len=4, batch_size=4, focus_new=True, replay_fraction=1.0))
    assert 0 < focus.num_samples < full.num_samples
    assert every.num_samples == full.num_samples  # everyone replayed: the full data
    focus.set_epoch(0)
    targets = 0
    users = set()
    for batch in focus:
        counted = batch["targets"][:, 1:]
        assert bool((batch["new"][:, 1:] | ~counted).all())  # every counted target is a new event
        targets += int(counted.sum())
        users.update(batch["users"].tolist())
    # 20 returning users x (6 new events - 2 held out for valid and test) + 5 new users x 3: each once.
    assert targets == 20 * 4 + 5 * 3  # a new user's first event has no history to predict it from
    assert len(users) == 25
    # A replay sample adds whole histories of some users (a seeded, stable choice).
    some = ShardDataset(data, StreamConfig(max_len=4, batch_size=4, focus_new=True, replay_fraction=0.5))
    chosen = some.replayed(np.arange(1000))
    assert 0.4 < chosen.mean() < 0.6 and np.array_equal(chosen, some.replayed(np.arange(1000)))
    assert focus.num_samples < some.num_samples < full.num_samples


def test_retrain_refuses_what_it_cannot_continue(generations, tmp_path):
    root, data, second = generations
    parent = root / "parent"
    train_run(parent, tiny(data, max_steps=4), **QUIET)
    with pytest.raises(ConfigError, match="nothing new"):
        retrain(parent, data, root / "a", {}, **QUIET)
    with pytest.raises(ConfigError, match="not a run folder"):
        retrain(tmp_path / "nothing", data, root / "b", {}, **QUIET)
    shard([second], data, append=True)
    with pytest.raises(ConfigError, match="must be a new run folder"):
        retrain(parent, data, parent, {}, **QUIET)
    third = write_lines(root / "g3.csv", ["user,item,ts,event_type", *events(range(3), 12, 1_800_000_000, 4)])
    shard([third], data, append=True)
    with pytest.raises(ConfigError, match="retrain on generation 2 first"):
        retrain(parent, data, root / "c", {}, **QUIET)
    assert not (root / "c" / "config.yaml").exists()  # nothing written for a refused retrain


def test_an_interrupted_retrain_resumes_instead_of_starting_over(generations):
    root, data, second = generations
    parent = root / "parent"
    train_run(parent, tiny(data, max_steps=10), **QUIET)
    shard([second], data, append=True)
    out = root / "retrained"
    out.mkdir()
    (out / "STOP").touch()  # what the Slurm script's preemption trap does
    overrides = {"train": {"max_steps": 8}, "checkpoint": {"every_steps": 0}}
    stopped = retrain(parent, data, out, overrides, **QUIET)
    assert stopped["stopped_at_step"] == 1
    first = ckpt.latest_valid(out)
    messages: list[str] = []
    metrics = retrain(parent, data, out, overrides, log=messages.append)
    assert any(f"resumed from {first} at step 1" in m for m in messages)
    assert not any(m.startswith("grew ") for m in messages)  # not re-initialised from the parent
    assert ckpt.read_state(ckpt.latest_valid(out))["step"] == 8 and metrics["count"] > 0
