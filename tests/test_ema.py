"""train.ema_decay: a moving average of the trainable weights is what validation, early stopping
and best/ use; it is checkpointed and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import crash_then_resume, tiny_config
from torch import nn

from trainer import checkpoint as ckpt
from trainer.ema import WeightAverage
from trainer.errors import ConfigError
from trainer.run import train_run


def test_the_average_follows_the_warm_up_and_swaps_in_and_out():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    model[1].weight.requires_grad_(False)  # frozen: not averaged (a LoRA run's backbone)
    start = model[0].weight.detach().clone()
    average = WeightAverage(model, decay=0.9)
    assert "1.weight" not in average.names and "0.weight" in average.names
    with torch.no_grad():
        model[0].weight += 1.0
    average.update(model)  # decay min(0.9, 1/10) = 0.1: 90% of the way to the new weights
    with torch.no_grad():
        model[0].weight += 1.0
    average.update(model)  # decay 2/11
    first = 0.1 * start + 0.9 * (start + 1)
    expected = (2 / 11) * first + (9 / 11) * (start + 2)
    raw = model[0].weight.detach().clone()
    with average.swapped_in(model):
        torch.testing.assert_close(model[0].weight, expected)
    assert torch.equal(model[0].weight, raw)  # its own weights again
    restored = WeightAverage(model, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert restored.updates == 2 and torch.equal(restored.average[0], average.average[0])
    with pytest.raises(ConfigError, match="ema_decay"):
        WeightAverage(model, decay=1.0)


def test_best_holds_the_average_and_a_resumed_run_repeats_it_bit_for_bit(tmp_path, cyclic_data, monkeypatch):
    cfg = tiny_config(cyclic_data, max_steps=30, eval_every=30)
    cfg.train.ema_decay = 0.9
    train_run(tmp_path / "straight", cfg, log=lambda *a: None)
    final = tmp_path / "straight" / "step-00000030"
    raw, best = ckpt.load_weights(final), ckpt.load_weights(tmp_path / "straight" / "best")
    average = ckpt.load_optimizer(final)["ema"]["average"]
    assert average.keys() == best.keys() == raw.keys()
    assert all(torch.equal(best[n], average[n]) for n in best)  # validated and kept: the average
    assert any(not torch.equal(best[n], raw[n]) for n in best)  # not the raw weights
    crash_then_resume(monkeypatch, tmp_path / "resumed", cfg, 20)
    again = ckpt.load_weights(tmp_path / "resumed" / "best")
    assert all(torch.equal(again[n], best[n]) for n in best)


def test_ema_needs_a_decay_below_one(cyclic_data):
    with pytest.raises(ConfigError, match="train.ema_decay 1.0"):
        tiny_config(cyclic_data, ema_decay=1.0)
