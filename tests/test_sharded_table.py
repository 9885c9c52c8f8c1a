"""trainer.sharded_table: TorchRec row-wise sharding + FBGEMM fused row-wise Adagrad on gloo ranks,
checked against a hand-written dense reference of the same update."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

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

REPO = Path(__file__).resolve().parent.parent
ITEMS, DIM, LR, EPS, STEPS = 37, 8, 0.05, 1e-8, 3
NEW = 6
"""Rows a grown table adds (new items of a retrain)."""


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


def reference(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, accumulators) of exact row-wise Adagrad by hand, on the mean of the ranks' losses
    (gradients averaged over ranks)."""
    table, acc = initial_table(), torch.zeros(ITEMS)
    for step in range(STEPS):
        weights = table.clone().requires_grad_(True)
        batches = [batch(rank, step) for rank in range(world)]
        (sum(loss_of(weights[ids], target) for ids, target in batches) / world).backward()
        touched = torch.unique(torch.cat([ids.reshape(-1) for ids, _ in batches]))
        grad = weights.grad[touched]
        acc[touched] += (grad * grad).mean(1)
        table[touched] -= LR * grad / (acc[touched].sqrt() + EPS)[:, None]
    return table, acc


def _rank(rank: int, world: int, port: int, out: str) -> None:
    from trainer.sharded_table import ShardedItemTable

    with gloo_group(rank, world, port):
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
        accumulators = [None] * world
        dist.all_gather_object(accumulators, (first, table.accumulator().clone()))
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
            accumulator = torch.cat([a for _, a in sorted(accumulators, key=lambda x: x[0])])
            torch.save({"full": full, "accumulator": accumulator, "spans": spans, "found": found}, out)


@pytest.mark.parametrize("world", [1, 2])
def test_sharded_updates_and_sliced_ranking_equal_the_dense_reference(tmp_path, world):
    out = str(tmp_path / "result.pt")
    spawn_ranks(_rank, world, world, free_port(), out)
    result = torch.load(out)
    spans = sorted(result["spans"])
    # Row-wise: the ranks' slices tile the catalogue, in order, without overlap.
    assert spans[0][0] == 0 and sum(count for _, count in spans) == ITEMS
    assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))
    if world == 2:
        assert all(count > 0 for _, count in spans)
    expected, accumulator = reference(world)
    assert not torch.allclose(expected, initial_table())  # the steps moved rows
    torch.testing.assert_close(result["full"], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(result["accumulator"], accumulator)  # the gradients' scale (mean over ranks)
    # Ranking by catalogue slices equals ranking the dense table, for every rank's own queries.
    for rank, (ranks, top_scores, top_ids) in enumerate(result["found"]):
        dense_ranks, dense_scores, dense_ids = dense_ranking(result["full"], rank)
        assert torch.equal(ranks, dense_ranks)
        assert torch.equal(top_ids, dense_ids)
        torch.testing.assert_close(top_scores, dense_scores)
    assert result["found"][0][0][0] == 2**40  # the excluded target


GROUP_RELEASED = """
import json, os, sys
from pathlib import Path
import torch
from trainer.sharded_run import ensure_process_group, release_process_group
from trainer.sharded_table import ShardedItemTable

def threads():
    return sorted(Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task"))

imported_first = "torch.distributed.nn.functional" in sys.modules
ensure_process_group()
table = ShardedItemTable(37, 8)
table(torch.arange(1, 9)).sum().backward()
during = threads()
del table
release_process_group()
import torch.distributed.nn.functional as fn
defaults = [repr(d) for f in (fn.all_reduce, fn.all_to_all_single, fn.broadcast) for d in f.__defaults__ or ()]
print(json.dumps({"imported_first": imported_first, "during": during, "after": threads(), "defaults": defaults}))
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads the threads from /proc")
def test_a_released_group_takes_its_gloo_threads_with_it():
    # A one-process sharded run in a fresh interpreter. TorchRec imports torch.distributed.nn.functional,
    # whose collectives default to group.WORLD as it was at import: imported under a live group they
    # kept it past destroy_process_group (so did the table's reference cycles), its gloo threads ran
    # into interpreter shutdown, and CI saw a finished rank abort (SIGABRT).
    done = subprocess.run([sys.executable, "-c", GROUP_RELEASED], capture_output=True, text=True, cwd=REPO, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["imported_first"]  # the run, not the imports above, decides when it loads
    assert "pt_gloo_runloop" in seen["during"]  # the probe sees the group's threads
    assert not any("gloo" in name for name in seen["after"]), seen["after"]
    assert "None" in seen["defaults"] and not any("ProcessGroup" in d for d in seen["defaults"])


def test_needs_a_process_group():
    from trainer.sharded_table import ShardedItemTable

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this worker")
    with pytest.raises(RuntimeError, match="process group"):
        ShardedItemTable(10, 4)


def _steps(table, rank: int, world: int, steps: range) -> None:
    """Train ``steps`` of the saving run's schedule; one rank plays every rank of a 2-rank run
    (gradients are averaged over ranks, so its loss is the mean of theirs)."""
    for step in steps:
        batches = [batch(r, step) for r in (range(2) if world == 1 else [rank])]
        # One lookup per step: each lookup's backward is one optimizer update of the rows it read.
        rows = table(torch.cat([ids for ids, _ in batches])).split(len(batches[0][0]))
        (sum(loss_of(r, target) for r, (_, target) in zip(rows, batches, strict=True)) / len(batches)).backward()


def _gathered_accumulators(table) -> torch.Tensor:
    parts = [None] * dist.get_world_size()
    first, _ = table.local_rows()
    dist.all_gather_object(parts, (first, table.accumulator().clone()))
    return torch.cat([a for _, a in sorted(parts, key=lambda x: x[0])])


def _checkpoint_rank(rank: int, world: int, port: int, folder: str, mode: str, out: str) -> None:
    from trainer.sharded_files import load_dense_rows, load_table, save_table
    from trainer.sharded_table import ShardedItemTable

    with gloo_group(rank, world, port):
        table = ShardedItemTable(ITEMS + NEW * (mode == "grow"), DIM, lr=LR, eps=EPS, vocab_version="v3")
        result = {}
        if mode == "grow":
            assert load_table(table, folder, grow=True) == ITEMS
            result["loaded"] = table.full_table()
            table.fill_from(ITEMS, 1)
            result["filled"] = table.full_table()
            result["accumulator"] = _gathered_accumulators(table)
            assert load_dense_rows(table, f"{folder}-dense.safetensors", "items.ids.weight") == ITEMS
            result["from_dense"] = table.full_table()
            with pytest.raises(ValueError, match=f"a table of {ITEMS} x {DIM} does not fit this one of {ITEMS - 1} x"):
                load_table(ShardedItemTable(ITEMS - 1, DIM), folder, grow=True)
        elif mode == "save":
            result["initial"] = table.full_table()
            table.load_full(initial_table())
            _steps(table, rank, world, range(STEPS))
            save_table(table, folder)
            result["saved"] = table.full_table()
            result["saved_accumulator"] = _gathered_accumulators(table)
            if rank == 0:  # the same rows as a dense run's weights file
                from safetensors.torch import save_file

                save_file({"items.ids.weight": result["saved"]}, f"{folder}-dense.safetensors")
        else:
            load_table(table, folder)
            result["loaded"] = table.full_table()
        if mode != "grow":
            _steps(table, rank, world, range(STEPS, STEPS + 2))
            result["after"] = table.full_table()
        if mode == "resume" and world == 1:
            with pytest.raises(IndexError, match=f"item id {ITEMS} is outside the item table of {ITEMS} ids .*v3"):
                table(torch.tensor([1, ITEMS]))
            with pytest.raises(ValueError, match=f"a table of {ITEMS} x {DIM}, this one is {ITEMS} x {DIM + 4}"):
                load_table(ShardedItemTable(ITEMS, DIM + 4), folder)
            with pytest.raises(ValueError, match="multiple of 4"):
                ShardedItemTable(ITEMS, DIM + 1)
        if rank == 0:
            torch.save(result, out)


def test_a_sharded_checkpoint_resumes_in_two_ranks_and_reshards_to_one(tmp_path):
    folder = tmp_path / "table"

    def run(world: int, mode: str) -> dict:
        out = str(tmp_path / f"{mode}{world}.pt")
        spawn_ranks(_checkpoint_rank, world, world, free_port(), str(folder), mode, out)
        return torch.load(out)

    saved = run(2, "save")
    # Each rank initialised its own slice (one seed on every rank gave item i and i + 19 twins).
    assert not torch.isclose(saved["initial"][:18], saved["initial"][19:]).all(1).any()
    files = sorted(p.name for p in folder.iterdir())
    assert files == ["item_rows-00000-of-00002.safetensors", "item_rows-00001-of-00002.safetensors", "item_rows.json"]
    same = run(2, "resume")
    assert torch.equal(same["loaded"], saved["saved"])
    # Rows and their Adagrad accumulators came back: the next steps are bit-identical.
    assert torch.equal(same["after"], saved["after"])
    assert not torch.equal(saved["after"], saved["saved"])
    one = run(1, "resume")  # resharded: one rank reads both files
    assert torch.equal(one["loaded"], saved["saved"])
    # One rank averages the two ranks' losses in another order: equal up to float rounding.
    torch.testing.assert_close(one["after"], saved["after"], rtol=0, atol=1e-6)
    for world in (1, 2):  # grown (new items of a retrain): old rows and their accumulators kept
        grown = run(world, "grow")
        assert torch.equal(grown["loaded"][:ITEMS], saved["saved"])
        assert torch.equal(grown["accumulator"][:ITEMS], saved["saved_accumulator"])
        assert torch.equal(grown["accumulator"][ITEMS:], torch.zeros(NEW))
        # New rows start as the mean known row (ids 1.., as trainer.checkpoint.grow_and_load).
        mean = saved["saved"][1:].double().mean(0).float()
        torch.testing.assert_close(grown["filled"][ITEMS:], mean.expand(NEW, -1), rtol=0, atol=1e-6)
        assert torch.equal(grown["filled"][:ITEMS], saved["saved"])
        # From a dense run's weights file: its rows, each rank reading its own slice.
        assert torch.equal(grown["from_dense"][:ITEMS], saved["saved"])


def test_a_damaged_sharded_checkpoint_names_its_file(tmp_path):
    from trainer.sharded_files import read_index

    folder = tmp_path / "table"
    folder.mkdir()
    with pytest.raises(ValueError, match="holds no sharded item table"):
        read_index(folder, ITEMS, DIM)
    (folder / "item_rows.json").write_text("{not json")
    with pytest.raises(ValueError, match="item_rows.json is not valid JSON"):
        read_index(folder, ITEMS, DIM)
