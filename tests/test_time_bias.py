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
from trainer.model import LoraConfig, ModelConfig, relative_time_mask

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
    with pytest.raises(ConfigError, match="model.time_bias.*bgpt eval"):
        load_run(tmp_path / "run", log=lambda *a: None)


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
