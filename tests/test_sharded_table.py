"""trainer.sharded_table: TorchRec row-wise sharding + FBGEMM fused row-wise Adagrad on gloo ranks,
checked against a hand-written dense reference of the same update."""

from __future__ import annotations

import os
import socket

import pytest
import torch

pytest.importorskip("torchrec", exc_type=ImportError)
pytest.importorskip("fbgemm_gpu", exc_type=ImportError)

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ITEMS, DIM, LR, EPS, STEPS = 37, 8, 0.05, 1e-8, 3


def loss_of(rows: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((rows.sum(1) - target) ** 2).mean()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own batch: ids repeat within and across ranks (the sums must be right)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randint(0, ITEMS, (4, 5), generator=g), torch.randn(4, DIM, generator=g)


def ranking_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each rank a different number of queries and exclusion widths; rank 0's first target is
    excluded (a miss)."""
    g = torch.Generator().manual_seed(7 + rank)
    n, width = 5 - 2 * rank, 3 + rank
    queries, targets = torch.randn(n, DIM, generator=g), torch.randint(1, ITEMS, (n,), generator=g)
    exclude = torch.randint(1, ITEMS, (n, width), generator=g)
    if rank == 0:
        exclude[0, 0] = targets[0]
    return queries, targets, exclude


def dense_ranking(table: torch.Tensor, rank: int):
    from trainer.evaluate import target_ranks

    queries, targets, exclude = ranking_inputs(rank)
    scores = queries @ table.T
    scores.scatter_(1, exclude, float("-inf"))
    ids = torch.arange(ITEMS).expand(len(scores), -1)
    by_score = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :5]  # stable: ties by id
    return target_ranks(scores, targets), scores.gather(1, by_score), ids.gather(1, by_score)


def initial_table() -> torch.Tensor:
    return torch.randn(ITEMS, DIM, generator=torch.Generator().manual_seed(0))


def reference(world: int) -> torch.Tensor:
    """Exact row-wise Adagrad by hand, on the ranks' summed loss (gradients summed over ranks)."""
    table, acc = initial_table(), torch.zeros(ITEMS)
    for step in range(STEPS):
        weights = table.clone().requires_grad_(True)
        batches = [batch(rank, step) for rank in range(world)]
        sum(loss_of(weights[ids], target) for ids, target in batches).backward()
        touched = torch.unique(torch.cat([ids.reshape(-1) for ids, _ in batches]))
        grad = weights.grad[touched]
        acc[touched] += (grad * grad).mean(1)
        table[touched] -= LR * grad / (acc[touched].sqrt() + EPS)[:, None]
    return table


def _rank(rank: int, world: int, port: str, out: str) -> None:
    from trainer.sharded_table import ShardedItemTable

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        table = ShardedItemTable(ITEMS, DIM, lr=LR, eps=EPS)
        with pytest.raises(ValueError, match="expected"):
            table.load_full(torch.zeros(ITEMS + 1, DIM))
        table.load_full(initial_table())
        first, rows = table.local_rows()
        spans = [None] * world
        dist.all_gather_object(spans, (first, rows.shape[0]))
        for step in range(STEPS):
            ids, target = batch(rank, step)
            looked_up = table(ids)
            assert looked_up.shape == (4, 5, DIM)
            loss_of(looked_up, target).backward()
        full = table.full_table()
        # Ids are gathered as int64 (a float32 trip would round ids past 2**24).
        from trainer.sharded_table import _gather_rows

        (big,), _ = _gather_rows([torch.tensor([[2**40 + 1 + rank]])])
        assert big.reshape(-1).tolist() == [2**40 + 1 + r for r in range(world)]
        queries, targets, exclude = ranking_inputs(rank)
        ranks = table.target_ranks(queries, targets, exclude, block=7)
        top_scores, top_ids = table.topk(queries, 5, exclude, block=7)
        found = [None] * world
        dist.all_gather_object(found, (ranks, top_scores, top_ids))
        if rank == 0:
            torch.save({"full": full, "spans": spans, "found": found}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_updates_and_sliced_ranking_equal_the_dense_reference(tmp_path, world):
    out = str(tmp_path / "result.pt")
    mp.spawn(_rank, args=(world, _free_port(), out), nprocs=world)
    result = torch.load(out)
    spans = sorted(result["spans"])
    # Row-wise: the ranks' slices tile the catalogue, in order, without overlap.
    assert spans[0][0] == 0 and sum(count for _, count in spans) == ITEMS
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    if world == 2:
        assert all(count > 0 for _, count in spans)
    expected = reference(world)
    assert not torch.allclose(expected, initial_table())  # the steps moved rows
    torch.testing.assert_close(result["full"], expected, rtol=0, atol=1e-5)
    # Ranking by catalogue slices equals ranking the dense table, for every rank's own queries.
    for rank, (ranks, top_scores, top_ids) in enumerate(result["found"]):
        dense_ranks, dense_scores, dense_ids = dense_ranking(result["full"], rank)
        assert torch.equal(ranks, dense_ranks)
        assert torch.equal(top_ids, dense_ids)
        torch.testing.assert_close(top_scores, dense_scores)
    assert result["found"][0][0][0] == 2**40  # the excluded target


def test_needs_a_process_group():
    from trainer.sharded_table import ShardedItemTable

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this worker")
    with pytest.raises(RuntimeError, match="process group"):
        ShardedItemTable(10, 4)
