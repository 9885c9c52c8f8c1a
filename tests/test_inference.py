"""Inference form of a trained run: key/value-cached appends, exports, int8, batch prediction."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_lines
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

from launch.cli import main as bgpt
from trainer.config import build_config
from trainer.errors import ConfigError
from trainer.export import export_run, load_export, load_inference
from trainer.predict import History, histories_from_data, histories_from_events, predict, write_predictions
from trainer.run import load_run_model, train_run

MAX_LEN = 6


def run_config(data, backbone="scratch", heads=None, **model):
    return build_config(
        {
            "data": {"path": str(data), "num_workers": 0},
            "model": {
                "backbone": backbone,
                "hidden_size": 32,
                "num_heads": 2,
                "num_layers": 2,
                "dropout": 0.1,
                "max_len": MAX_LEN,
                **model,
            },
            "lora": {"r": 4},
            "train": {"micro_batch_size": 16, "lr": 5e-3, "warmup_steps": 5, "eval_every": 0, "max_steps": 60},
            "heads": heads or {"type_weight": 0.5, "time_weight": 0.1},
            "checkpoint": {"every_steps": 0},
        }
    )


@pytest.fixture(scope="module")
def scratch_run(tmp_path_factory, cyclic_data):
    run = tmp_path_factory.mktemp("inf") / "run"
    train_run(run, run_config(cyclic_data), log=lambda *a: None)
    return run


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, cyclic_data):
    """A tiny pretrained-style Llama backbone with LoRA adapters (the SmolLM2 code path)."""
    root = tmp_path_factory.mktemp("lora")
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    train_run(
        root / "run",
        run_config(cyclic_data, backbone=str(root / "llama"), item_text="none", pretrained_weights=True),
        log=lambda *a: None,
    )
    return root / "run"


def reference_hidden(run, items, types, times):
    """The training model's own hidden state after the last of these events (no inference folding)."""
    model, _, _ = load_run_model(run, log=lambda *a: None)
    t = lambda v: torch.tensor([v], dtype=torch.int64)  # noqa: E731
    batch = {"items": t(items), "types": t(types), "times": t(times), "mask": torch.ones(1, len(items), dtype=bool)}
    with torch.no_grad():
        return model.hidden_states(batch)[0, -1]


@pytest.mark.parametrize("which", ["scratch_run", "lora_run"])
def test_cached_appends_match_encoding_the_whole_window(which, request):
    run = request.getfixturevalue(which)
    model = load_inference(run)
    items = [3, 4, 5, 6, 7, 8]
    types = [1, 1, 1, 2, 2, 2]
    times = [1_600_000_000_000 + 60_000 * i for i in range(6)]
    state = model.start(items[:2], types[:2], times[:2])
    for i in range(2, 6):
        state = model.append(state, items[i], types[i], times[i])
    full = model.start(items, types, times)
    assert state.length == 6 and state.cache.get_seq_length() == 6
    torch.testing.assert_close(state.hidden, full.hidden, atol=1e-5, rtol=1e-5)
    # and both equal the training model's forward pass (LoRA merged, item table folded)
    torch.testing.assert_close(full.hidden, reference_hidden(run, items, types, times), atol=1e-5, rtol=1e-5)
    batch = model.encode(*(torch.tensor([v]) for v in (items, types, times)), torch.ones(1, 6, dtype=bool))
    torch.testing.assert_close(batch[0], full.hidden, atol=1e-5, rtol=1e-5)


def test_the_trained_model_predicts_the_next_item_of_the_cycle(scratch_run):
    model = load_inference(scratch_run)
    ids = model.item_ids(["i3", "i4", "i5"])
    state = model.start(ids, model.type_ids(["view", "view", "view"]), [0, 60_000, 120_000])
    top, _ = model.top_k(state.hidden[None], 1)
    assert model.items[top[0, 0]] == "i6"
    assert model.event_types[int(model.side_predictions(state.hidden[None])["next_event_type"][0])] == "buy"


@pytest.mark.parametrize("merge", [True, False])
def test_an_export_scores_like_the_run_and_its_backbone_loads_in_plain_transformers(lora_run, tmp_path, merge):
    out = tmp_path / "export"
    meta = export_run(lora_run, out, merge=merge)
    assert meta["merged_lora"] is merge and (out / "adapter.safetensors").exists() is not merge
    from_run, from_export = load_inference(lora_run), load_export(out)
    state_a = from_run.start([3, 4, 5], [1, 1, 1], [0, 1000, 2000])
    state_b = from_export.start([3, 4, 5], [1, 1, 1], [0, 1000, 2000])
    torch.testing.assert_close(state_a.hidden, state_b.hidden, atol=1e-5, rtol=1e-5)
    assert from_export.items == from_run.items and from_export.version == from_run.version
    backbone = AutoModel.from_pretrained(out / "backbone")
    assert type(backbone).__name__ == "LlamaModel"
    if merge:  # merged weights alone reproduce the served backbone
        x = torch.randn(1, 4, 32)
        torch.testing.assert_close(
            backbone(inputs_embeds=x).last_hidden_state, from_run.backbone(inputs_embeds=x).last_hidden_state
        )


def test_int8_export_is_quantized_and_close_to_fp32(scratch_run, tmp_path):
    export_run(scratch_run, tmp_path / "q", quantize="int8")
    fp32, int8 = load_inference(scratch_run), load_export(tmp_path / "q")
    assert int8.quantized and "DynamicQuantizedLinear" in repr(int8.backbone)  # GPT-2 Conv1D converted first
    a = fp32.start([3, 4, 5], [1, 1, 1], [0, 1000, 2000]).hidden
    b = int8.start([3, 4, 5], [1, 1, 1], [0, 1000, 2000]).hidden
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert fp32.top_k(a[None], 1)[0][0, 0] == int8.top_k(b[None], 1)[0][0, 0]


def test_export_refuses_to_overwrite_and_bad_sources_are_named(scratch_run, tmp_path):
    out = tmp_path / "e"
    export_run(scratch_run, out)
    with pytest.raises(ConfigError, match="--overwrite"):
        export_run(scratch_run, out)
    export_run(scratch_run, out, overwrite=True)
    assert not list(tmp_path.glob(".e.*"))  # no temporary or old folder left beside it
    with pytest.raises(ConfigError, match="neither a run folder"):
        load_inference(tmp_path)
    meta = json.loads((out / "export.json").read_text())
    (out / "export.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(ConfigError, match="export format 99"):
        load_export(out)


def test_predict_writes_every_user_with_side_predictions(scratch_run, cyclic_data, tmp_path):
    model = load_inference(scratch_run)
    out = tmp_path / "preds.parquet"
    stats = write_predictions(model, histories_from_data(cyclic_data, model), out, k=3, progress=False)
    table = pq.read_table(out).to_pylist()
    assert stats["users"] == 48 == len(table)
    row = next(r for r in table if r["user"] == "u0")  # u0 walked i0..i9: next is i10
    assert row["items"][0] == "i10" and row["next_event_type"] == "buy" and row["next_event_seconds"] > 0
    assert row["scores"] == sorted(row["scores"], reverse=True)
    h = History("x", np.array(model.item_ids(["i4", "i5"])), np.array([1, 1]), np.array([0, 60_000]))
    excluded = predict(model, [h], k=11, exclude_seen=True)[0]["items"]
    assert len(excluded) == 10 and not {"i4", "i5"} & set(excluded)  # 12 items, 2 seen: 10 left, not 11


def test_predict_from_a_raw_events_file_skips_bad_rows_and_unknown_items(scratch_run, tmp_path, capsys):
    rows = [
        "user,item,ts,event_type",
        "a,i1,1600000000,view",
        "a,i2,1600000060,view",
        "a,nope,1600000090,view",
        "b,i7,1600000000,buy",
        "b,i8,not-a-time,buy",
        "a,i3,1600000120,view",
    ]
    events = write_lines(tmp_path / "live.csv", rows)
    model = load_inference(scratch_run)
    messages = []
    histories = {h.user: h for h in histories_from_events(events, model, log=messages.append)}
    assert [model.items[i] for i in histories["a"].items] == ["i1", "i2", "i3"]
    assert "skipped 1 invalid rows and 1 events of unknown items" in messages[0]
    assert (
        bgpt(["predict", "--run", str(scratch_run), "--events", str(events), "--out", str(tmp_path / "p.parquet")]) == 0
    )
    table = pq.read_table(tmp_path / "p.parquet").to_pydict()
    assert table["user"] == ["a", "b"] and table["items"][0][0] == "i4" and table["items"][1][0] == "i8"


def test_the_inference_form_scores_the_test_split_like_the_training_model(scratch_run, cyclic_data):
    from trainer.evaluate import EvalConfig, evaluate_inference
    from trainer.run import evaluate_run

    reference = evaluate_run(scratch_run, "test", [1, 10], log=lambda *a: None)
    folded = evaluate_inference(load_inference(scratch_run), cyclic_data, "test", EvalConfig(ks=[1, 10]))
    for key in ("hr@1", "ndcg@10", "mrr", "coverage@10", "count"):
        assert folded[key] == pytest.approx(reference[key], abs=1e-6)


@pytest.mark.parametrize("gate", [False, True])
def test_a_model_that_scores_at_a_time_with_a_transition_prior_exports_and_evaluates_alike(cyclic_data, tmp_path, gate):
    """model.query_time + model.transition_prior (+ its gate): the inference form, an export and the
    training model give the same scores and the same test metrics."""
    from trainer.evaluate import EvalConfig, evaluate_inference
    from trainer.run import evaluate_run

    run = tmp_path / "run"
    cfg = run_config(cyclic_data, query_time=True, transition_prior=True, repeat_prior=True, transition_gate=gate)
    train_run(run, cfg, log=lambda *a: None)
    model, _, _ = load_run_model(run, log=lambda *a: None)
    assert (run / "item_pairs.npz").exists() and bool((model.prior.weight.detach() != 0).all())
    assert (model.prior.gate is not None) == gate
    if gate:  # trained away from its zero start
        assert bool((model.prior.gate.weight.detach() != 0).any())
    reference = evaluate_run(run, "test", [1, 10], log=lambda *a: None)
    folded = evaluate_inference(load_inference(run), cyclic_data, "test", EvalConfig(ks=[1, 10]))
    for key in ("hr@1", "ndcg@10", "mrr", "count"):
        assert folded[key] == pytest.approx(reference[key], abs=1e-6)
    export_run(run, tmp_path / "export")
    from_run, from_export = load_inference(run), load_export(tmp_path / "export")
    hidden = from_run.start([3, 4, 5], [1, 1, 1], [0, 60_000, 120_000]).hidden[None]
    last, gap = from_run.context([[3, 4, 5]]), torch.tensor([60_000])
    torch.testing.assert_close(from_run.scores(hidden, last, gap), from_export.scores(hidden, last, gap))
    with pytest.raises(ConfigError, match="time of the prediction"):
        from_export.scores(hidden, last)
    records = predict(
        from_export,
        [History("u", np.array([3, 4, 5]), np.ones(3, int), np.array([0, 60_000, 120_000]))],
        3,
        at_ms=180_000,
    )
    assert len(records[0]["items"]) == 3
