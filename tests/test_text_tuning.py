"""The LLM item-text tower fine-tuned with the model (model.text_tuning=lora, HLLM style): fresh
vectors for the items a step reads, the cached table, its refresh before evaluation, exact resume,
and new items read through the tuned tower."""

from __future__ import annotations

import pytest
import torch
from conftest import crash_then_resume, shard
from safetensors.torch import load_file
from test_text_tower import log_with_titles, tower_config

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer import checkpoint as ckpt
from trainer import text_tower
from trainer.config import build_config
from trainer.errors import ConfigError
from trainer.new_items import ItemWriter
from trainer.run import load_run_model, train_run


def tuned_config(data, tower_dir, **train):
    cfg = tower_config(data, tower_dir, **train)
    cfg.model.text_tuning = "lora"
    cfg.lora.r, cfg.lora.dropout = 4, 0.0
    return cfg


@pytest.fixture
def titled(tmp_path):
    events, items = log_with_titles(tmp_path, range(30), 1_600_000_000)
    data = tmp_path / "data"
    shard([events], data, items=str(items))
    return data


def tuned_vectors(model, texts: list[str | None], ids: list[int]) -> torch.Tensor:
    """The tuned tower's standardised vectors of items ``ids``, through text_tower.encode (one item
    per batch, no padding) with the model's adapters."""
    tower = model.items.tower
    raw, _ = text_tower.encode(texts, tower, tower.spec.pooling, tower.spec.max_tokens, batch_size=1)
    return text_tower.standardize(raw[ids], (tower.mean, tower.std))[0]


def test_the_tuned_tower_trains_and_evaluation_reads_the_table_its_weights_give(tmp_path, titled, tower_dir):
    run = tmp_path / "run"
    lines = []
    train_run(run, tuned_config(titled, tower_dir, max_steps=6), log=lines.append)
    weights = load_file(str(ckpt.latest_valid(run) / ckpt.WEIGHTS))
    adapters = [n for n in weights if n.startswith("items.tower.") and "lora_B" in n]
    assert adapters and any(weights[n].abs().sum() > 0 for n in adapters)  # B starts at 0: it trained
    # The frozen tower is not saved: only its adapters and the cache's state.
    tower = {n for n in weights if n.startswith("items.tower.") and "lora_" not in n}
    assert tower == {"items.tower.dirty", "items.tower.steps"}
    assert "items.text" in weights  # the cache travels with the adapters

    model, _, info = load_run_model(run, data=titled, weights="last")
    have = [i for i in range(NUM_RESERVED_ITEMS, info.num_items) if info.texts[i]]
    expected = tuned_vectors(model, info.texts, have)
    # The run's final evaluation read a refreshed table, and the checkpoint kept it.
    assert not bool(model.items.tower.dirty)
    torch.testing.assert_close(model.items.text[have], expected, atol=1e-5, rtol=1e-5)
    # A stale cache (adapters moved since the last full pass) is encoded again before it is read.
    model.items.text[have] = 0.0
    model.items.tower.dirty.fill_(True)
    with torch.no_grad():
        table = model.items.table()
    assert not bool(model.items.tower.dirty)
    torch.testing.assert_close(model.items.text[have], expected, atol=1e-5, rtol=1e-5)
    from_parts = model.items.ids.weight[have] + model.items.text_proj(expected)
    from_parts = from_parts + model.items._attribute_rows(torch.tensor(have))
    torch.testing.assert_close(table[have], from_parts, atol=1e-5, rtol=1e-5)


def test_a_step_encodes_the_items_it_reads_with_gradients_and_the_rest_from_the_cache(titled, tower_dir, tmp_path):
    from trainer.factory import build_model

    cfg = tuned_config(titled, tower_dir)
    cfg.model.text_tuned_items = 2
    model, _ = build_model(cfg.model, cfg.lora, cfg.heads, titled, cache=tmp_path)
    model.train()
    tower, cache_before = model.items.tower, model.items.text.clone()
    read = torch.tensor([NUM_RESERVED_ITEMS + 1, NUM_RESERVED_ITEMS, NUM_RESERVED_ITEMS + 1, NUM_RESERVED_ITEMS + 3])
    rows = model.items._text(read)
    assert rows.requires_grad and bool(tower.dirty)
    rows.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tower.model.named_parameters() if "lora_" in n)
    # At most 2 of the 3 distinct items were encoded afresh; each read row is its item's.
    torch.testing.assert_close(rows[0], rows[2])
    changed = (model.items.text != cache_before).any(1).sum()
    assert changed <= 2
    untouched = torch.ones(len(cache_before), dtype=torch.bool)
    untouched[read] = False
    assert torch.equal(model.items.text[untouched], cache_before[untouched])


def test_a_resumed_run_reaches_the_same_adapters_and_cache(tmp_path, titled, tower_dir, monkeypatch):
    cfg = tuned_config(titled, tower_dir, max_steps=8)
    cfg.checkpoint.every_steps = 4
    cfg.model.text_refresh_every = 3
    train_run(tmp_path / "straight", cfg, log=lambda *a: None)
    crash_then_resume(monkeypatch, tmp_path / "resumed", cfg, 4)
    a = load_file(str(tmp_path / "straight" / "step-00000008" / ckpt.WEIGHTS))
    b = load_file(str(tmp_path / "resumed" / "step-00000008" / ckpt.WEIGHTS))
    assert a.keys() == b.keys() and "items.text" in a
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_new_items_read_the_tuned_tower_in_process_and_from_an_export_state(tmp_path, titled, tower_dir):
    run = tmp_path / "run"
    train_run(run, tuned_config(titled, tower_dir, max_steps=4), log=lambda *a: None)
    model, _, _ = load_run_model(run, data=titled, weights="last")
    writer = ItemWriter.from_model(model)
    assert writer.text["tuned"]["r"] == 4 and writer.tower_weights
    titles, attributes = ["red ball coat", "blue shoe"], ["kind=sport", None]
    live = writer.vectors(titles, attributes)
    tensors, meta = writer.state()
    rebuilt = ItemWriter.from_state(tensors, meta)  # an export: the adapters rebuilt on the frozen tower
    torch.testing.assert_close(rebuilt.vectors(titles, attributes), live, atol=1e-5, rtol=1e-5)
    frozen = ItemWriter.from_state({k: v for k, v in tensors.items() if ".tower." not in k}, meta)
    with pytest.raises(ConfigError, match="lacks its adapters"):
        frozen.vectors(titles, attributes)


def test_tuning_needs_the_llm_tower(tmp_path):
    with pytest.raises(ConfigError, match="set model.item_text=llm"):
        build_config({"data": {"path": str(tmp_path)}, "model": {"item_text": "minilm", "text_tuning": "lora"}})
    with pytest.raises(ConfigError, match="text_tuning 'full'"):
        build_config({"data": {"path": str(tmp_path)}, "model": {"item_text": "llm", "text_tuning": "full"}})


def test_an_exported_tuned_model_places_a_new_item_with_the_same_text_as_its_trained_twin(tmp_path, titled, tower_dir):
    from trainer.export import export_run, load_inference

    run = tmp_path / "run"
    train_run(run, tuned_config(titled, tower_dir, max_steps=4), log=lambda *a: None)
    export_run(run, tmp_path / "export")
    model = load_inference(tmp_path / "export", log=lambda *a: None)
    trained, _, info = load_run_model(run, log=lambda *a: None)
    i3 = model.item_index["i3"]
    assert model.add_items(["twin"], [info.titles[i3]], [info.attributes[i3]]) == ["twin"]
    # Same text through the same tuned tower: the rows differ by i3's id row alone (a new item of
    # a model that reads text has a zero id part).
    torch.testing.assert_close(
        model.item_table[model.item_index["twin"]] - model.item_table[i3],
        -trained.items.ids.weight[i3].detach(),
        atol=1e-5,
        rtol=1e-5,
    )
