"""The model on a sharded item table (trainer.item_rows + trainer.sharded_table): the same
training as the dense table, step for step, when both use row-wise Adagrad for the id rows and
AdamW for the rest, on 1 and 2 gloo ranks under DDP."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from conftest import free_port, gloo_group, spawn_ranks

# Checked without importing them: TorchRec/FBGEMM load only in the processes the tests start, so
# a pytest worker that later forks (loader workers) carries none of their threads.
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchrec") is None or importlib.util.find_spec("fbgemm_gpu") is None,
    reason="torchrec and fbgemm-gpu(-cpu) are not installed",
)

import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

ITEMS, HIDDEN, STEPS, ROW_LR, LR = 61, 16, 20, 0.05, 3e-3


def build(sharded: bool):
    from data_sharding.vocab import NUM_RESERVED_ITEMS
    from trainer import backbone as backbones
    from trainer.heads import HeadsConfig
    from trainer.item_features import ItemFeatures
    from trainer.model import BehaviorGPT, ModelConfig

    cfg = ModelConfig(backbone="scratch", num_layers=1, hidden_size=HIDDEN, num_heads=2, dropout=0.0, max_len=12)
    heads = HeadsConfig(item_loss="sampled", num_negatives=8, type_weight=0.5, time_weight=0.5, value_weight=0)
    torch.manual_seed(0)
    backbone = backbones.build_scratch("gpt2", 1, HIDDEN, 2, cfg.max_len + 1, 0.0)
    # Attributes: every item has one or two of 5 (their vectors are computed for the looked-up rows).
    ids = np.concatenate([[1 + i % 5, 1 + (i * 3) % 5][: 1 + i % 2] for i in range(ITEMS)]).astype(np.int64)
    lengths = np.array([1 + i % 2 for i in range(ITEMS)])
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    features = ItemFeatures(
        attribute_ids=torch.from_numpy(ids), attribute_offsets=torch.from_numpy(offsets), num_attributes=6
    )
    counts = np.ones(ITEMS)
    counts[:NUM_RESERVED_ITEMS] = 0
    model = BehaviorGPT(cfg, heads, backbone, ITEMS, 3, features, counts, sharded_items=sharded)
    model.backbone.get_input_embeddings().requires_grad_(False)  # as trainer.factory.build_model does
    return model


def batch(rank: int, step: int) -> dict[str, torch.Tensor]:
    from data_sharding.vocab import NUM_RESERVED_ITEMS

    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(4, 13, (6,), generator=g)
    mask = torch.arange(12)[None, :] < lengths[:, None]
    items = torch.randint(NUM_RESERVED_ITEMS, ITEMS, (6, 12), generator=g) * mask
    times = torch.cumsum(torch.randint(1, 10**7, (6, 12), generator=g), 1) * mask
    types = torch.randint(1, 3, (6, 12), generator=g) * mask
    return {"items": items, "times": times, "types": types, "mask": mask}


def _train(rank: int, world: int, port: int, out: str) -> None:
    from trainer.item_rows import RowwiseAdagrad, dense_parameters, prepare_for_ddp, sharded_names

    with gloo_group(rank, world, port):
        dense, sharded = build(False), build(True)
        # The same start: the dense model's weights, its id rows loaded into the sharded table.
        weights = dict(dense.named_parameters())
        with torch.no_grad():
            for name, param in sharded.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        sharded.items.sharded.load_full(dense.items.ids.weight.detach())
        rows = {n: p.data_ptr() for n, p in sharded.items.sharded.named_parameters()}
        assert prepare_for_ddp(sharded, "cpu:0")  # accelerate's device on CPU ranks
        ignored = sharded_names(sharded)
        assert ignored and all(".sharded." in n for n in ignored)
        # Placing the model leaves the table's rows where TorchRec trains them: `Module.to` made
        # a detached copy of them (4 x dim bytes per row of every rank, never trained).
        assert {n: p.data_ptr() for n, p in sharded.items.sharded.named_parameters()} == rows
        arms = {}
        id_rows = [dense.items.ids.weight]
        others = [p for p in dense.parameters() if p.requires_grad and p is not dense.items.ids.weight]
        arms["dense"] = (DDP(dense), [torch.optim.AdamW(others, lr=LR), RowwiseAdagrad(id_rows, lr=ROW_LR)])
        sharded.items.sharded.dmp.fused_optimizer.param_groups[0]["lr"] = ROW_LR
        sharded.items.sharded.dmp.fused_optimizer.step()  # sets FBGEMM's learning rate
        assert len(dense_parameters(sharded)) == len(others)
        arms["sharded"] = (DDP(sharded), [torch.optim.AdamW(dense_parameters(sharded), lr=LR)])
        losses = {name: [] for name in arms}
        for step in range(STEPS):
            for name, (model, optimizers) in arms.items():
                torch.manual_seed(10 * step + rank)  # the same negatives in both arms
                loss = model(batch(rank, step))["loss"]
                loss.backward()
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                summed = loss.detach().clone()
                dist.all_reduce(summed)
                losses[name].append(float(summed) / world)
        table = sharded.items.sharded.full_table()
        found = _evaluations(sharded, table, rank, world)
        if rank == 0:
            torch.save(
                {"losses": losses, "table": table, "dense_table": dense.items.ids.weight.detach(), "found": found}, out
            )


def _evaluations(sharded, table: torch.Tensor, rank: int, world: int) -> dict:
    """Metrics of the sharded model by the sharded evaluator (each rank its share of 5 batches) and
    of a dense twin with the same weights by the dense one (every batch, in one process)."""
    from trainer.eval_part import WHOLE, Part
    from trainer.evaluate import EvalConfig, evaluate_batches
    from trainer.sharded_eval import evaluate_sharded

    twin = build(False)
    weights = dict(sharded.named_parameters())
    with torch.no_grad():
        for name, param in twin.named_parameters():
            param.copy_(table if name == "items.ids.weight" else weights[name])
    batches = [batch(7, 100 + i) for i in range(5)]
    batches[0]["items"][0, 2] = batches[0]["items"][0, int(batches[0]["mask"][0].sum()) - 1]  # a repeat
    part = Part(rank, world, _gather) if world > 1 else WHOLE
    found = {}
    for exclude in (True, False):
        cfg = EvalConfig(ks=[1, 5, 10], exclude_seen=exclude)
        found[exclude] = (evaluate_sharded(sharded, batches, cfg, torch.device("cpu"), part),
                          evaluate_batches(twin, batches, cfg, torch.device("cpu")))  # fmt: skip
    return found


def _gather(objects: list) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, objects[0])
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_the_sharded_item_table_trains_the_model_as_the_dense_one_does(tmp_path, world):
    out = str(tmp_path / "result.pt")
    spawn_ranks(_train, world, world, free_port(), out)
    result = torch.load(out)
    dense, sharded = np.array(result["losses"]["dense"]), np.array(result["losses"]["sharded"])
    assert dense[-1] < dense[0]  # it trains
    np.testing.assert_allclose(sharded, dense, rtol=1e-4)
    torch.testing.assert_close(result["table"], result["dense_table"], rtol=0, atol=1e-5)
    # The sharded evaluator (catalogue slices, batches shared over ranks) reports the dense one's metrics.
    for exclude, (got, want) in result["found"].items():
        assert got == want, exclude
        assert want["count"] == 30 and 0 < want["ndcg@10"] < 1 and "type_accuracy" in want


def test_row_table_reads_rows_by_item_id():
    from trainer.item_rows import RowTable

    table = RowTable(torch.tensor([2, 5, 9]), torch.arange(6.0).reshape(3, 2))
    assert table[torch.tensor([[9, 2], [5, 5]])].tolist() == [[[4.0, 5.0], [0.0, 1.0]], [[2.0, 3.0], [2.0, 3.0]]]
    with pytest.raises(ValueError, match="RowTable needs"):
        RowTable(torch.tensor([1, 2]), torch.zeros(3, 2))


def test_rowwise_adagrad_steps_rows_by_their_mean_squared_gradient():
    from trainer.item_rows import RowwiseAdagrad

    weight = torch.nn.Parameter(torch.zeros(3, 2))
    opt = RowwiseAdagrad([weight], lr=0.5)
    weight.grad = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 1.0]])
    opt.step()
    # Row 0: acc = (9 + 16) / 2 = 12.5; step = 0.5 * g / sqrt(12.5). Row 1 unchanged. Row 2: acc 1.
    expected = torch.tensor([[-1.5, -2.0], [0.0, 0.0], [-0.5, -0.5]]) / torch.tensor([[12.5**0.5], [1.0], [1.0]])
    torch.testing.assert_close(weight.detach(), expected)
    assert opt.state[weight]["sum"].tolist() == [12.5, 0.0, 1.0]
