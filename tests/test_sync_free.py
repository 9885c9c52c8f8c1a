"""The sync-free training step: no op that makes the host wait for the device, the same numbers.

On a GPU a host synchronisation (a value read into Python, a data-dependent shape) stalls the
queue of kernels; ``trainer.syncs.HostSyncs`` finds those ops through the dispatcher on CPU too.
"""

import numpy as np
import pytest
import torch

from data_sharding.stream import ShardDataset, StreamConfig
from trainer.factory import build_model
from trainer.heads import HeadsConfig
from trainer.item_encoder import _first_occurrences, _padded_bags
from trainer.model import LoraConfig, ModelConfig, block_causal_mask
from trainer.syncs import HostSyncs


def test_the_detector_finds_each_kind_of_host_sync():
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    found = {}
    for name, run in {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.any()),
        "mask_index": lambda: x[mask],
        "unique": lambda: torch.unique(x),
        "repeat": lambda: torch.repeat_interleave(x, torch.tensor([1, 2, 0, 1, 1, 1])),
        "bincount": lambda: torch.bincount(x.long()),
        "fixed_shapes": lambda: (x * mask).sum() + torch.repeat_interleave(x, 2)[:3].sum(),
    }.items():
        with HostSyncs() as syncs:
            run()
        found[name] = len(syncs.found)
    assert found == {"item": 1, "bool": 1, "mask_index": 1, "unique": 1, "repeat": 1, "bincount": 1, "fixed_shapes": 0}


@pytest.fixture(scope="module")
def batch(dataset):
    """A packed batch where only some positions are targets (as an incremental run's)."""
    out = next(iter(ShardDataset(dataset, StreamConfig(max_len=12, batch_size=24, seed=3, pack=True))))
    keep = torch.rand(out["targets"].shape, generator=torch.Generator().manual_seed(0)) < 0.6
    return {**out, "targets": out["targets"] & keep}


def _model(dataset, family: str, item_loss: str, sync_free, **model):
    cfg = ModelConfig(
        backbone="scratch", scratch_family=family, hidden_size=16, num_heads=2, num_layers=1, max_len=12, **model
    )
    heads = HeadsConfig(item_loss=item_loss, num_negatives=32, sync_free=bool(sync_free))
    torch.manual_seed(0)
    return build_model(cfg, LoraConfig(), heads, dataset)[0]


def _step(model, batch, seed: int = 1):
    model.zero_grad()
    torch.manual_seed(seed)  # the same negatives and dropout masks in every arm
    out = model(batch)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("item_loss", ["full", "sampled"])
def test_a_sync_free_step_reads_nothing_back(dataset, batch, family, item_loss):
    model = _model(dataset, family, item_loss, sync_free=True, query_time=True, id_dropout=0.2, dropout=0.1)
    assert model.items.attributes is not None and model.items.attribute_bags is not None
    with HostSyncs() as syncs:
        _step(model, batch)
    assert syncs.found == []
    gathered = _model(dataset, family, item_loss, sync_free=False, query_time=True, id_dropout=0.2, dropout=0.1)
    with HostSyncs() as syncs:
        _step(gathered, batch)
    assert syncs.found  # the gathered step does sync (what sync_free removes)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("item_loss", ["full", "sampled"])
def test_a_sync_free_step_gives_the_gathered_steps_losses_and_gradients(dataset, batch, family, item_loss):
    # (no id dropout here: its random draw is per needed id, and the gathered step needs fewer)
    model = dict(query_time=True, dropout=0.1, transition_prior=True, transition_steps=2, repeat_prior=True)
    runs = []
    for sync_free in (True, False):
        built = _model(dataset, family, item_loss, sync_free, **model)
        with torch.no_grad():  # the priors start at 0: give them weight so their columns matter
            built.prior.weight.fill_(0.5)
            built.repeat.weight.fill_(0.3)
        runs.append(_step(built, batch))
    (free, free_grads), (gathered, gathered_grads) = runs
    assert int(free["targets"]) == int(gathered["targets"]) < int(batch["mask"].sum())
    for key in ("item", "type", "time", "value", "loss"):
        assert torch.allclose(free[key], gathered[key], rtol=1e-5, atol=1e-6), key
    assert free_grads.keys() == gathered_grads.keys()
    for name, grad in free_grads.items():
        assert torch.allclose(grad, gathered_grads[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("sync_free", [True, False])
def test_a_batch_without_targets_trains_nothing_yet_every_head_is_in_the_graph(dataset, batch, sync_free):
    model = _model(dataset, "gpt2", "sampled", sync_free=sync_free)
    out, grads = _step(model, {**batch, "targets": torch.zeros_like(batch["targets"])})
    assert int(out["targets"]) == 0 and float(out["loss"].detach()) == 0.0
    heads = {n for n in grads if n.startswith("heads.")}
    assert {"heads.type_head.weight", "heads.time_head.weight", "heads.value_head.weight"} <= heads
    assert all(float(g.abs().sum()) == 0 for g in grads.values())


def test_padded_attribute_bags_give_the_gathered_bags_mean(dataset):
    encoder = _model(dataset, "gpt2", "sampled", sync_free=True).items
    needed = torch.tensor([5, 1, 9, 5, 0, 30])
    padded = encoder._attribute_rows(needed)
    encoder.attribute_bags = None  # the gathered path
    assert torch.allclose(padded, encoder._attribute_rows(needed), atol=1e-6)
    ids, lengths = torch.tensor([3, 4, 0, 7, 8, 9]), torch.tensor([2, 1, 3])
    assert _padded_bags(ids, lengths).tolist() == [[3, 4, 0], [0, 0, 0], [7, 8, 9]]
    assert _padded_bags(torch.arange(10), torch.tensor([10, 0, 0, 0, 0])) is None  # 50 cells for 10 links


def test_a_table_of_repeated_ids_equals_the_table_of_the_unique_ids(dataset):
    encoder = _model(dataset, "gpt2", "sampled", sync_free=True).items
    needed = torch.tensor([7, 3, 7, 7, 12, 3, 0])
    assert _first_occurrences(needed).tolist() == [1, 1, 0, 0, 1, 0, 1]
    assert torch.equal(encoder.table(needed), encoder.table(torch.unique(needed)))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_packed_mask_keeps_windows_apart_in_both_attention_kinds(attention):
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = block_causal_mask(positions, torch.float32, attention)[0, 0]
    allowed = mask if attention == "sdpa" else mask == 0
    expected = np.zeros((6, 6), bool)
    for lo, hi in ((0, 3), (3, 5), (5, 6)):
        expected[lo:hi, lo:hi] = np.tril(np.ones((hi - lo, hi - lo), bool))
    assert allowed.numpy().tolist() == expected.tolist()
    assert block_causal_mask(positions, torch.float32, "flash_attention_2") is None


def test_eager_and_sdpa_attention_give_the_same_packed_states(dataset, batch):
    model = _model(dataset, "llama", "sampled", sync_free=True)
    model.eval()
    with torch.no_grad():
        sdpa = model.hidden_states(batch)
        model.backbone.set_attn_implementation("eager")
        eager = model.hidden_states(batch)
    real = batch["mask"]
    assert torch.allclose(sdpa[real], eager[real], atol=1e-5)


def _flags_rank(rank: int, port: int, out) -> None:
    import types

    import torch.distributed as dist

    from trainer.runtime import ControlFlags

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    accelerator = types.SimpleNamespace(num_processes=2, device=torch.device("cpu"))
    flags = ControlFlags(accelerator, timeout_minutes=1, own_group=True)  # the group a GPU run uses
    out.put((rank, flags.any_of(rank == 1, False, True), flags.group is not None))
    dist.destroy_process_group()


def test_control_flags_agree_over_their_own_cpu_group():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_flags_rank, args=(rank, port, out)) for rank in range(2)]
    for p in procs:
        p.start()
    answers = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert answers == [(0, [True, False, True], True), (1, [True, False, True], True)]


def test_the_step_is_sync_free_by_default_on_gpus_with_packed_batches_of_targets_only():
    from trainer.config import build_config

    assert build_config({}).sync_free_step(cuda=True) is True
    assert build_config({}).sync_free_step(cuda=False) is False
    assert build_config({"data": {"pack": False}}).sync_free_step(cuda=True) is False
    assert build_config({"data": {"focus_new": True}}).sync_free_step(cuda=True) is False
    assert build_config({"heads": {"sync_free": True}}).sync_free_step(cuda=False) is True
