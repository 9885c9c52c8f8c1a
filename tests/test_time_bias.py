"""model.time_bias: the HSTU-style relative attention bias by time before the prediction."""

import pytest
import torch
from conftest import tiny_config
from test_next_period import cyclic_generations

from data_sharding.stream import ShardDataset, StreamConfig
from trainer.config import build_config
from trainer.errors import ConfigError
from trainer.factory import build_model
from trainer.heads import HeadsConfig, time_bucket
from trainer.model import LoraConfig, ModelConfig
from trainer.time_bias import relative_time_mask

MINUTE, HOUR = 60_000, 3_600_000


def _model(dataset, family: str, time_bias: bool, attention: str = "sdpa"):
    cfg = ModelConfig(
        backbone="scratch", scratch_family=family, hidden_size=16, num_heads=2, num_layers=2, max_len=12,
        query_time=True, time_bias=time_bias,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, LoraConfig(), HeadsConfig(time_weight=0.0), dataset)[0].eval()
    model.backbone.set_attn_implementation(attention)
    return model


def test_the_mask_holds_the_bias_of_each_keys_time_before_the_next_event():
    times = torch.tensor([[0, MINUTE, HOUR, HOUR + 2_000, 0]])  # one window of 4 events, then padding
    batch = {"times": times, "mask": torch.tensor([[True, True, True, True, False]])}
    bias = torch.arange(2 * 32, dtype=torch.float32).view(32, 2)  # (buckets, heads): every cell distinct
    mask = relative_time_mask(batch, bias, 32)[0]
    assert mask.shape == (2, 5, 5)
    low = torch.finfo(torch.float32).min
    predicted_at = [MINUTE, HOUR, HOUR + 2_000, HOUR + 2_000, 0]  # the last event: its own time
    for head in range(2):
        for q in range(5):
            for k in range(5):
                visible = k <= q and (k < 4 or k == q)  # padding is seen by its own position only
                gap = torch.tensor(predicted_at[q] - int(times[0, k]))
                expected = bias[time_bucket(gap, 32), head] if visible else low
                assert mask[head, q, k] == expected, (head, q, k)


def test_packed_windows_keep_apart_under_the_bias():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    batch = {"times": torch.arange(6)[None] * HOUR, "positions": positions, "mask": torch.ones(1, 6, dtype=torch.bool)}
    bias = torch.arange(32, dtype=torch.float32)[:, None].repeat(1, 2)
    mask = relative_time_mask(batch, bias, 32)[0, 0]
    # A window's last event (2 and 4) predicts at its own time, not at the next window's first.
    assert mask[2, 2] == 0 and mask[1, 1] == bias[time_bucket(torch.tensor(HOUR), 32), 0]
    mask = torch.where(mask > torch.finfo(torch.float32).min, 0.0, mask)
    visible = torch.zeros(6, 6, dtype=torch.bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6)):
        visible[lo:hi, lo:hi] = torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril()
    assert torch.equal(mask == 0, visible)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [False, True])
def test_a_zero_bias_leaves_the_states_as_they_were(dataset, family, attention, pack):
    batch = next(iter(ShardDataset(dataset, StreamConfig(max_len=12, batch_size=24, seed=3, pack=pack))))
    plain, biased = _model(dataset, family, False, attention), _model(dataset, family, True, attention)
    assert biased.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["time_bias"]
    with torch.no_grad():
        a, b = plain.hidden_states(batch), biased.hidden_states(batch)
    real = batch["mask"]
    assert torch.allclose(a[real], b[real], atol=1e-5)


def test_a_state_reads_the_time_it_predicts_and_nothing_later(dataset):
    model = _model(dataset, "gpt2", True)
    with torch.no_grad():
        model.time_bias.normal_(0, 1.0)
    batch = next(iter(ShardDataset(dataset, StreamConfig(max_len=12, batch_size=8, seed=3))))
    row, pos = 0, 4
    assert batch["mask"][row, : pos + 3].all()
    later = {k: v.clone() for k, v in batch.items()}
    later["items"][row, pos + 1 :] = 3  # the predicted item and everything after it: unseen
    later["times"][row, pos + 2 :] += 10 * HOUR
    moved = {k: v.clone() for k, v in batch.items()}
    moved["times"][row, pos + 1 :] += 10 * HOUR  # the moment of the prediction: seen
    with torch.no_grad():
        base = model.hidden_states(batch)[row, pos]
        assert torch.allclose(model.hidden_states(later)[row, pos], base, atol=1e-6)
        assert not torch.allclose(model.hidden_states(moved)[row, pos], base, atol=1e-4)
        # Evaluation hides the predicted event from the mask but keeps its time: the same state.
        hidden = {**batch, "mask": batch["mask"].clone()}
        hidden["mask"][row, pos + 1 :] = False
        assert torch.allclose(model.hidden_states(hidden)[row, pos], base, atol=1e-6)


def test_the_bias_trains_and_the_run_predicts_the_next_period(tmp_path):
    from trainer.export import load_run
    from trainer.run import load_run_model, train_run

    data = cyclic_generations(tmp_path)
    cfg = tiny_config(data, max_steps=40, eval_every=20)
    cfg.data.validate_on_newest, cfg.heads.time_weight, cfg.model.time_bias = True, 0.0, True
    metrics = train_run(tmp_path / "run", cfg, log=lambda *a: None)
    assert metrics["protocol"] == "next-period" and metrics["hr@1"] > 0.9
    model = load_run_model(tmp_path / "run", log=lambda *a: None)[0]
    assert model.time_bias.abs().sum() > 0
    assert torch.equal(load_run(tmp_path / "run", log=lambda *a: None).time_bias, model.time_bias.detach())


def test_a_sync_free_step_with_the_bias_reads_nothing_back(dataset):
    from trainer.syncs import HostSyncs

    batch = next(iter(ShardDataset(dataset, StreamConfig(max_len=12, batch_size=24, seed=3, pack=True))))
    cfg = ModelConfig(backbone="scratch", hidden_size=16, num_heads=2, num_layers=1, max_len=12, time_bias=True)
    model = build_model(cfg, LoraConfig(), HeadsConfig(time_weight=0.0, sync_free=True), dataset)[0]
    with HostSyncs() as syncs:
        model(batch)["loss"].backward()
    assert syncs.found == [] and model.time_bias.grad.abs().sum() > 0


def test_settings_that_cannot_work_are_refused(dataset, monkeypatch):
    with pytest.raises(ConfigError, match="heads.time_weight=0"):
        build_config({"model": {"time_bias": True}})
    build_config({"model": {"time_bias": True}, "heads": {"time_weight": 0}})
    from trainer import backbone as backbones

    scratch = backbones.build_scratch

    def flash(*args, **kwargs):
        built = scratch(*args, **kwargs)
        built.model.config._attn_implementation_internal = "flash_attention_2"
        return built

    monkeypatch.setattr(backbones, "build_scratch", flash)
    with pytest.raises(ConfigError, match="sdpa or eager"):
        _model(dataset, "gpt2", True)


def _windows(rows: list[tuple[list[int], list[int], int]]):
    """Left-aligned (items, types, times, mask) of histories ``(items, times, at)``, each followed
    by its prediction time as evaluation holds it (a hidden event at ``at``), and the ``at``s."""
    width = max(len(items) for items, _, _ in rows) + 1
    out = {k: torch.zeros(len(rows), width, dtype=torch.int64) for k in ("items", "types", "times")}
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for r, (items, times, at) in enumerate(rows):
        n = len(items)
        out["items"][r, :n], out["types"][r, :n], out["times"][r, : n + 1] = (
            torch.tensor(items),
            1,
            torch.tensor([*times, at]),
        )
        mask[r, :n] = True
    return out["items"], out["types"], out["times"], mask, torch.tensor([at for _, _, at in rows])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_inference_form_reads_the_time_of_the_request_as_training_does(dataset, family, attention):
    """Batch encoding, a cached window and one built by appends all give the training model's state
    for a prediction at the request's time; the cache does not change when read."""
    from types import SimpleNamespace

    from trainer.inference import InferenceModel

    model = _model(dataset, family, True, attention)
    with torch.no_grad():
        model.time_bias.normal_(0, 1.0)
    t0 = 1_600_000_000_000
    items, times = (
        [5, 9, 3, 7, 11, 4],
        [t0, t0 + 30_000, t0 + 2 * HOUR, t0 + 2 * HOUR + 5_000, t0 + 72 * HOUR, t0 + 73 * HOUR],
    )
    at = times[-1] + 10 * MINUTE
    batch = _windows([(items, times, at), (items[:4], times[:4], times[3] + 400 * HOUR)])
    with torch.no_grad():
        reference = model.hidden_states(dict(zip(("items", "types", "times", "mask"), batch[:4], strict=True)))
    reference = torch.stack([reference[0, 5], reference[1, 3]])
    vocab = model.items.table().shape[0]
    info = SimpleNamespace(items=[f"i{i}" for i in range(vocab)], titles=[None] * vocab)
    inference = InferenceModel.from_model(model, info, ["pad", "view"], "v")
    torch.testing.assert_close(inference.encode(*batch), reference, atol=1e-5, rtol=1e-5)
    state = inference.start(items[:1], [1], times[:1])
    for i in range(1, 6):
        state = inference.append(state, items[i], 1, times[i])
    fresh = inference.start(items, [1] * 6, times)
    assert state.length == fresh.length == 6 and state.cache.get_seq_length() == fresh.cache.get_seq_length() == 5
    for built in (state, fresh, state):  # read twice: the cache is left as it was
        torch.testing.assert_close(inference.hidden_at(built, at), reference[0], atol=1e-5, rtol=1e-5)
    assert state.cache.get_seq_length() == 5
    assert not torch.allclose(inference.hidden_at(state, at + 400 * HOUR), reference[0], atol=1e-3)
    with pytest.raises(ConfigError, match="time of the prediction"):
        inference.encode(*batch[:4])


@pytest.fixture(scope="module")
def bias_run(tmp_path_factory, cyclic_data):
    from test_inference import run_config

    from trainer.run import train_run

    run = tmp_path_factory.mktemp("bias") / "run"
    cfg = run_config(cyclic_data, heads={"type_weight": 0.5, "time_weight": 0.0}, time_bias=True)
    train_run(run, cfg, log=lambda *a: None)
    return run


def test_a_run_with_the_bias_exports_evaluates_and_predicts_like_the_training_model(bias_run, cyclic_data, tmp_path):
    import numpy as np

    from trainer.evaluate import EvalConfig, evaluate_inference
    from trainer.export import export_run, load_export, load_inference
    from trainer.predict import History, predict
    from trainer.run import evaluate_run

    reference = evaluate_run(bias_run, "test", [1, 10], log=lambda *a: None)
    from_run = load_inference(bias_run)
    folded = evaluate_inference(from_run, cyclic_data, "test", EvalConfig(ks=[1, 10]))
    for key in ("hr@1", "ndcg@10", "mrr", "count"):
        assert folded[key] == pytest.approx(reference[key], abs=1e-6)
    assert reference["hr@1"] > 0.9
    export_run(bias_run, tmp_path / "export")
    from_export = load_export(tmp_path / "export")
    torch.testing.assert_close(from_export.time_bias, from_run.time_bias)
    times = [0, 60_000, 120_000]
    for model in (from_run, from_export):
        hidden = model.hidden_at(model.start([3, 4, 5], [1, 1, 1], times), 180_000)
        torch.testing.assert_close(hidden, model.hidden_at(from_run.start([3, 4, 5], [1, 1, 1], times), 180_000))
    history = History("u", np.array(from_run.item_ids(["i3", "i4", "i5"])), np.ones(3, int), np.array(times))
    assert predict(from_export, [history], 1, at_ms=180_000)[0]["items"] == ["i6"]


def test_a_served_window_with_the_bias_matches_a_fresh_encoding(bias_run, tmp_path):
    from test_serving import events

    from serving.service import Recommender, ServiceConfig

    service = Recommender(ServiceConfig(bias_run, tmp_path / "s.sqlite", history_size=20, slack=0, reload_seconds=0))
    model = service.current.model
    walk = [f"i{i % 12}" for i in range(9)]  # longer than max_len (6): the window is rebuilt
    service.add_events("u", events(walk[0]))
    assert service.recommend("u", None, 3)["items"]  # caches the window
    for n in range(2, len(walk) + 1):
        service.add_events("u", events(*walk[:n])[-1:])
        state = service.current.caches["u"]
        window = service.store.history("u")[-state.length :]
        fresh = model.start(*service._ids(model, window))
        at = state.last_time + 90_000
        torch.testing.assert_close(model.hidden_at(state, at), model.hidden_at(fresh, at), atol=1e-5, rtol=1e-5)
    assert service.recommend("u", None, 1)["items"][0]["item"] == "i9"
    service.stop()
