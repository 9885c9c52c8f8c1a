"""The LLM item-text tower (model.item_text=llm): pooled vectors, missing and long texts, caching,
training, offline loading errors, and new items' vectors from their text when a run grows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shard, write_lines
from transformers import AutoModel, PreTrainedTokenizerFast

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer import checkpoint as ckpt
from trainer import text_tower
from trainer.checkpoint import grow_and_load
from trainer.config import build_config, load_run_config
from trainer.errors import ConfigError
from trainer.factory import build_model
from trainer.run import train_run


def direct(tower_dir, ids: list[int]) -> torch.Tensor:
    """(T, D) last hidden states of the tower's base model on one unpadded sequence."""
    model = AutoModel.from_pretrained(tower_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0]


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_vector_equals_a_direct_forward_pass_on_the_item_text(tower_dir, pooling):
    r = NUM_RESERVED_ITEMS
    texts = [None] * r + ["red shoe", "blue hat. kind: sport, toy", None, "green ball coat " * 20]
    # Batches of two, longest first: the 12-token cut of the long text pads the 8-token one.
    vectors, report = text_tower.encode(texts, tower_dir, pooling=pooling, max_tokens=12, batch_size=2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tower_dir)
    head, _, tail = text_tower.PROMPT.partition("{text}")
    for row in (r, r + 1, r + 3):
        ids = tokenizer(texts[row], add_special_tokens=False)["input_ids"][:12]
        if pooling == "last":
            ids = tokenizer(head, add_special_tokens=False)["input_ids"] + ids
            ids += tokenizer(tail, add_special_tokens=False)["input_ids"]
        states = direct(tower_dir, ids)
        expected = states[-1] if pooling == "last" else states.mean(0)
        torch.testing.assert_close(vectors[row, :-1], expected, atol=1e-5, rtol=1e-5)
    # Reserved ids have neither text nor the no-text flag; item r + 2 has no text: zeros + the flag.
    assert vectors.shape == (r + 4, 25)
    assert torch.count_nonzero(vectors[:r]) == 0
    assert torch.count_nonzero(vectors[r + 2, :-1]) == 0 and vectors[r + 2, -1] == 1 and vectors[r, -1] == 0
    assert (report.items, report.missing, report.truncated) == (3, 1, 1)


def test_standardised_vectors_are_centred_unit_rows_and_keep_the_no_text_flag():
    raw = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [3.0, 100.0, 0.0], [1.0, 60.0, 0.0], [2.0, 20.0, 0.0]])
    out, (mean, std) = text_tower.standardize(raw)
    torch.testing.assert_close(mean, torch.tensor([2.0, 60.0]))
    assert torch.equal(out[:2], raw[:2])  # no text: zeros, the flag kept
    torch.testing.assert_close(out[2:, :2].norm(dim=1), torch.ones(3))
    # Each dimension weighs alike after scaling: (1, 1) / sqrt(2) for the first row with text.
    torch.testing.assert_close(out[2, :2], torch.tensor([1.0, 1.0]) / 2**0.5)
    # New rows reuse the catalogue's statistics.
    again, _ = text_tower.standardize(raw[2:3], (mean, std))
    torch.testing.assert_close(again, out[2:3])


def test_item_text_joins_the_title_and_attribute_names():
    assert text_tower.item_text("Red Shoe", "kind=sport|toy; colour=red") == "Red Shoe. kind: sport, toy. colour: red"
    assert text_tower.item_text(None, "kind=sport") == "kind: sport"
    assert text_tower.item_text("  ", "kind=") is None and text_tower.item_text(None, None) is None


def test_a_tower_that_cannot_be_loaded_offline_is_one_clear_error(tmp_path, tower_dir):
    with pytest.raises(ConfigError, match="no Hugging Face model directory"):
        text_tower.encode(["red"], tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tower_dir / "config.json").read_text())
    with pytest.raises(ConfigError, match="cannot be loaded offline"):
        text_tower.encode(["red"], broken)
    with pytest.raises(ConfigError, match="text_pooling"):
        build_config({"data": {"path": str(tmp_path)}, "model": {"text_pooling": "max"}})


def log_with_titles(root, users: range, start: int, new: bool = False):
    """Events over 10 items (4 more when ``new``) and an items file: titles and attributes, one
    item with neither."""
    names = ["red shoe", "blue hat", "green coat", "red ball", "blue toy", "", "green shoe", "red hat", "toy", "ball"]
    extra = ["blue ball", "green toy", "red coat", "blue shoe"] if new else []
    count = len(names) + len(extra)
    rows = ["user,item,ts,event_type"]
    for u in users:
        rows += [f"u{u},i{(u + t) % count},{start + 60 * (100 * u + t)},view" for t in range(8)]
    items = ["item,title,kind"] + [
        f"i{i},{name},{'sport' if i % 2 else ''}" for i, name in enumerate(names + extra) if i != 5
    ]
    tag = "new" if new else "old"
    return write_lines(root / f"e_{tag}.csv", rows), write_lines(root / f"items_{tag}.csv", items)


def tower_config(data, tower_dir, **train):
    return build_config(
        {
            "data": {"path": str(data), "num_workers": 0},
            "model": {
                "backbone": "scratch",
                "hidden_size": 16,
                "num_heads": 2,
                "num_layers": 1,
                "item_text": "llm",
                "text_model": str(tower_dir),
            },
            "train": {"micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_every": 0, "max_steps": 8, **train},
            "checkpoint": {"every_steps": 0},
        }
    )


def test_a_run_trains_on_cached_tower_vectors_and_grows_new_items_from_their_text(tmp_path, tower_dir):
    events, items = log_with_titles(tmp_path, range(30), 1_600_000_000)
    data = tmp_path / "data"
    shard([events], data, items=str(items))
    run = tmp_path / "run"
    lines = []
    train_run(run, tower_config(data, tower_dir), log=lines.append)
    assert any("LLM item-text tower (last pooling): 9 items encoded, 1 without text" in line for line in lines)
    cached = sorted(run.glob("item_text-llm-last-*.npy"))
    assert len(cached) == 1 and cached[0].with_suffix(".json").exists()

    # A new generation brings 4 items: their rows start from their text through the trained projection.
    new_events, new_items = log_with_titles(tmp_path, range(10, 40), 1_700_000_000, new=True)
    shard([new_events], data, items=str(new_items), append=True)
    cfg = load_run_config(run)
    model, info = build_model(cfg.model, cfg.lora, cfg.heads, data, cache=run)
    grow_and_load(model, ckpt.latest_valid(run), log=lambda *a: None)
    names = info.items
    texts = info.texts
    fresh = [names.index(f"i{i}") for i in range(10, 14)]
    # The newer vocabulary is standardised with the statistics the run trained with.
    first = json.loads(cached[0].with_suffix(".json").read_text())
    assert torch.equal(model.items.text_stats[0], torch.tensor(first["mean"]))
    raw, _ = text_tower.encode([texts[i] for i in fresh], tower_dir)
    expected, _ = text_tower.standardize(raw, model.items.text_stats)
    assert np.allclose(model.items.text[fresh].numpy(), expected.numpy(), atol=1e-5)
    with torch.no_grad():
        table = model.items.table()
        from_text = model.items.text_proj(expected)
        others = model.items.ids.weight[fresh] + model.items._attribute_rows(torch.tensor(fresh))
    # Each new row is its projected text plus its small untrained id row (and its attributes' mean
    # embedding): distinct items, distinct rows.
    assert torch.allclose(table[fresh] - others, from_text, atol=1e-5)
    assert torch.linalg.matrix_rank(from_text) == len(fresh)
