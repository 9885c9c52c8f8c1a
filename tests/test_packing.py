"""Sequence packing: several windows per row, attention within each, the same loss as unpacked."""

import numpy as np
import pytest
import torch

from data_sharding.batching import collate_windows, pack_rows
from data_sharding.errors import DataError
from data_sharding.stream import ShardDataset, StreamConfig
from trainer.config import build_config
from trainer.errors import ConfigError
from trainer.factory import build_model
from trainer.heads import HeadsConfig
from trainer.model import LoraConfig, ModelConfig


def test_pack_rows_places_every_window_once_without_overlap():
    lengths = [5, 3, 4, 2, 1, 6, 2]
    row, offset = pack_rows(lengths, width=6)
    taken = set()
    for r, o, n in zip(row, offset, lengths, strict=True):
        cells = {(int(r), int(o) + i) for i in range(n)}
        assert max(c for _, c in cells) < 6 and not cells & taken
        taken |= cells
    assert row.max() + 1 == 4  # 23 events in rows of 6: first-fit decreasing needs the minimum, 4


def test_a_window_longer_than_the_packed_row_is_refused_naming_both_numbers():
    with pytest.raises(DataError, match="7 events does not fit a packed row of 6"):
        pack_rows([7], width=6)
    with pytest.raises(DataError, match="pack_width 20 .* 51"):
        StreamConfig(max_len=50, pack=True, pack_width=20)
    with pytest.raises(ConfigError, match="data.pack_width 8 .* 11 events"):
        build_config({"data": {"pack_width": 8}, "model": {"max_len": 10}})


def _windows(rows: list[list[int]], start_ts: int = 1_000_000) -> list[np.ndarray]:
    from data_sharding import shards

    out = []
    for items in rows:
        w = np.zeros(len(items), dtype=shards.SEQ_DTYPE)
        w["item"], w["ts"] = items, start_ts + 60_000 * np.arange(len(items))
        w["value"] = np.nan
        out.append(w)
    return out


def test_packed_rows_restart_positions_and_never_target_across_windows():
    windows = _windows([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    batch = collate_windows(
        [1, 2, 3], windows, pack_width=6, targets=[np.array([1, 0, 1], bool), np.ones(2, bool), np.ones(4, bool)]
    )
    assert batch["items"].shape == (2, 6) and batch["users"].tolist() == [1, 2, 3]
    assert batch["items"].tolist() == [[10, 11, 12, 13, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    # A window's first event is never a target; the given per-window targets are kept.
    assert batch["targets"].tolist() == [[False, True, True, True, False, True], [False, False, True] + [False] * 3]


@pytest.fixture(scope="module")
def packed_and_plain(dataset):
    cfg = StreamConfig(max_len=12, batch_size=24, seed=3)
    plain = next(iter(ShardDataset(dataset, cfg)))
    packed = next(iter(ShardDataset(dataset, StreamConfig(max_len=12, batch_size=24, seed=3, pack=True))))
    return plain, packed


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("item_loss", ["full", "sampled"])
def test_packed_batches_give_the_same_losses_and_gradients_as_padded_ones(dataset, packed_and_plain, family, item_loss):
    plain, packed = packed_and_plain
    assert packed["items"].shape[0] < plain["items"].shape[0]  # fewer rows: the point of packing
    assert int(packed["mask"].sum()) == int(plain["mask"].sum())
    model_cfg = ModelConfig(
        backbone="scratch",
        scratch_family=family,
        hidden_size=16,
        num_heads=2,
        num_layers=2,
        dropout=0.0,
        max_len=12,
        query_time=True,
        transition_prior=True,
        transition_steps=2,
        repeat_prior=True,
    )
    heads = HeadsConfig(item_loss=item_loss, num_negatives=32, value_weight=0.1)
    torch.manual_seed(0)
    model, _ = build_model(model_cfg, LoraConfig(), heads, dataset)
    with torch.no_grad():  # the priors start at 0: give them weight so their inputs matter
        model.prior.weight.fill_(0.5)
        model.repeat.weight.fill_(0.3)
    results = []
    for batch in (plain, packed):
        model.zero_grad()
        torch.manual_seed(1)  # the same uniform negatives for the sampled loss
        out = model(batch)
        out["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    assert int(a["targets"]) == int(b["targets"])
    for key in ("item", "type", "time", "value", "loss"):
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-4, atol=1e-6), name


def test_a_sampled_step_builds_only_the_batch_items_vectors_with_the_same_loss_and_gradients(dataset, packed_and_plain):
    _, packed = packed_and_plain
    model_cfg = ModelConfig(backbone="scratch", hidden_size=16, num_heads=2, num_layers=1, dropout=0.0, max_len=12)
    torch.manual_seed(0)
    model, _ = build_model(model_cfg, LoraConfig(), HeadsConfig(item_loss="sampled", num_negatives=32), dataset)
    assert model.items.attributes is not None  # the synthetic items have attributes: the costly part
    full_table = model.items.table
    results = []
    for table in (full_table, lambda needed=None: full_table()):  # the subset, then every row
        model.items.table = table
        model.zero_grad()
        torch.manual_seed(1)
        out = model(packed)
        out["loss"].backward()
        results.append((out["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and "items.attributes.weight" in grads_a
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-5, atol=1e-7), name


def test_packed_rows_round_up_to_a_multiple_with_rows_of_padding(dataset):
    windows = _windows([[5, 6, 7], [8, 9], [10, 11, 12, 13]])
    plain = collate_windows([1, 2, 3], windows, pack_width=6)
    rounded = collate_windows([1, 2, 3], windows, pack_width=6, row_multiple=4)
    assert plain["items"].shape == (2, 6) and rounded["items"].shape == (4, 6)
    for key in ("items", "mask", "targets", "positions"):
        assert torch.equal(rounded[key][:2], plain[key]), key
    assert not rounded["mask"][2:].any() and not rounded["targets"][2:].any()
    assert rounded["positions"][2:].tolist() == [list(range(6))] * 2
    cfg = StreamConfig(max_len=12, batch_size=24, seed=3, pack=True, pack_row_multiple=24)
    shapes = {tuple(b["items"].shape) for b in ShardDataset(dataset, cfg)}
    assert shapes == {(24, 13)}  # one shape for every batch: 24 windows never need more than 24 rows
    with pytest.raises(DataError, match="pack_row_multiple must be >= 1"):
        StreamConfig(pack_row_multiple=0)
