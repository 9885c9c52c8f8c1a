"""Row-wise sharded item table on TorchRec + FBGEMM (issue 20: catalogues of 10M-100M items).

The dense item table (``trainer.model.ItemEncoder``) is a ``V x H`` ``nn.Embedding`` replicated on
every rank, with a dense gradient and AdamW state for every row: three to four copies of the
table per rank. ``ShardedItemTable`` keeps one slice of the rows on each rank (TorchRec row-wise
sharding), and a step moves only the rows it reads: a lookup sends each id to the rank that owns
it and the rows back (all-to-all), and the backward sends each row's gradient to its owner, where
FBGEMM's fused optimizer updates that row at once (no gradient tensor, no dense optimizer state).

Numerics, as FBGEMM defines them (checked against a hand-written reference in
tests/test_sharded_table.py):

- The optimizer is exact row-wise Adagrad, the one FBGEMM's CPU kernels and every GPU kernel
  support (Adam runs on GPUs only): one accumulator per row,
  ``acc += mean(g * g); row -= lr * g / (sqrt(acc) + eps)``, ``g`` the row's gradient summed over
  every occurrence of the id in the step (and averaged over ranks, below).
- Gradients are averaged over ranks, as DDP averages dense parameters (TorchRec's gradient
  division, on by default): a row's step on N ranks equals one process stepping on the mean of
  the N batches' losses. (Row-wise Adagrad's step does not change when every gradient of a row is
  scaled alike, so only the accumulators show the scale; the tests compare them.)

Versions: TorchRec and FBGEMM are built against one torch release each. With the project's torch
2.13, ``torchrec==1.8.0`` with ``fbgemm-gpu-cpu==1.8.0`` (CPU) or ``fbgemm-gpu==1.8.0`` (CUDA) load;
the 1.9 releases are built for a later torch and fail to load on 2.13 (``undefined symbol`` in
``fbgemm_gpu_tbe_index_select.so``). Install them with ``--no-deps`` (``make venv`` does: torchrec
depends on the CUDA ``fbgemm-gpu``, which a CPU machine does not want) plus the ``sharded`` extra.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
import torch.distributed as dist

TABLE = "item_rows"
"""The TorchRec table name (its feature is ``item``)."""


def _torchrec():
    try:
        import torchrec  # noqa: F401
        from fbgemm_gpu.split_embedding_configs import EmbOptimType  # noqa: F401
    except (ImportError, OSError) as e:
        raise ImportError(
            "the sharded item table needs TorchRec and FBGEMM built for this torch: "
            "pip install --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0 (fbgemm-gpu==1.8.0 on CUDA) "
            f"and pip install '.[sharded]' ({e})"
        ) from e


class ShardedItemTable(torch.nn.Module):
    """``num_items x dim`` rows split row-wise over the ranks of the default process group.

    Call it with any shape of item ids (each rank its own); it returns their rows (``ids.shape +
    (dim,)``), differentiable: ``loss.backward()`` updates the rows it read (the fused optimizer
    steps inside the backward; there is nothing to pass to a torch optimizer). Each call's backward
    is one update of the rows it read, so look a step's ids up in one call. Every rank must call it
    the same number of times per step (the lookup is a collective).
    """

    def __init__(
        self,
        num_items: int,
        dim: int,
        *,
        lr: float = 0.01,
        eps: float = 1e-8,
        init_std: float = 0.02,
        device: torch.device | str | None = None,
        vocab_version: str | None = None,
    ) -> None:
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ShardedItemTable needs an initialised torch.distributed process group")
        _torchrec()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.embedding_types import EmbeddingComputeKernel
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
        from torchrec.distributed.types import ShardingType

        self.num_items, self.dim = int(num_items), int(dim)
        if self.dim % 4:
            raise ValueError(f"the sharded item table's width must be a multiple of 4 (FBGEMM's kernels), not {dim}")
        if device is None:  # where the process group computes: a rank's GPU under NCCL
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.device = torch.device(device)
        self.vocab_version = vocab_version
        config = EmbeddingConfig(
            name=TABLE,
            embedding_dim=self.dim,
            num_embeddings=self.num_items,
            feature_names=["item"],
            init_fn=functools.partial(_normal_rows, std=init_std),
        )
        collection = EmbeddingCollection(tables=[config], device=torch.device("meta"))
        sharder = EmbeddingCollectionSharder(
            fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": lr, "eps": eps}
        )
        constraints = {
            TABLE: ParameterConstraints(
                sharding_types=[ShardingType.ROW_WISE.value],
                compute_kernels=[EmbeddingComputeKernel.FUSED.value],
            )
        }
        compute = "cuda" if self.device.type == "cuda" else "cpu"
        with _quiet_torchrec():
            planner = EmbeddingShardingPlanner(
                topology=Topology(world_size=dist.get_world_size(), compute_device=compute),
                constraints=constraints,
            )
            plan = planner.collective_plan(collection, [sharder], dist.GroupMember.WORLD)
            self.dmp = DistributedModelParallel(collection, device=self.device, plan=plan, sharders=[sharder])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        flat = ids.reshape(-1).to(self.device, torch.long)
        unique, inverse = torch.unique(flat, return_inverse=True)
        if len(unique) and (unique[0] < 0 or unique[-1] >= self.num_items):
            bad = int(unique[0] if unique[0] < 0 else unique[-1])
            version = f" (vocabulary version {self.vocab_version})" if self.vocab_version else ""
            raise IndexError(f"item id {bad} is outside the item table of {self.num_items:,} ids{version}")
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=["item"], values=unique, lengths=torch.ones_like(unique, dtype=torch.int32)
        )
        rows = self.dmp(features)["item"].values()
        return rows[inverse].view(*ids.shape, self.dim)

    def _shard(self):
        tensor = self.dmp.state_dict()[f"embeddings.{TABLE}.weight"]
        (shard,) = tensor.local_shards()
        return shard

    def accumulator(self) -> torch.Tensor:
        """This rank's row-wise Adagrad accumulators (a view of FBGEMM's state: one per row)."""
        state = self.dmp.fused_optimizer.state_dict()["state"][f"embeddings.{TABLE}.weight"]
        (shard,) = state[f"{TABLE}.momentum1"].local_shards()
        return shard.tensor

    def local_rows(self) -> tuple[int, torch.Tensor]:
        """``(first_id, rows)``: this rank's slice of the table (a view: scoring the catalogue by
        slices reads it without a copy; writing to it changes the table)."""
        shard = self._shard()
        return int(shard.metadata.shard_offsets[0]), shard.tensor

    def full_table(self) -> torch.Tensor:
        """The whole ``num_items x dim`` table on every rank (all-gather of the slices): for export
        and tests; it is the one thing a sharded run should not do at 100M items."""
        first, rows = self.local_rows()
        sizes = [None] * dist.get_world_size()
        dist.all_gather_object(sizes, (first, rows.shape[0]))
        out = torch.empty(self.num_items, self.dim, dtype=rows.dtype)
        for rank, (start, count) in enumerate(sizes):
            part = (
                rows.detach().cpu().clone()
                if rank == dist.get_rank()
                else torch.empty(count, self.dim, dtype=rows.dtype)
            )
            dist.broadcast(part, src=rank)
            out[start : start + count] = part
        return out

    @torch.no_grad()
    def target_ranks(
        self,
        queries: torch.Tensor,
        targets: torch.Tensor,
        exclude: torch.Tensor | None = None,
        block: int = 65536,
        complete=None,
    ) -> torch.Tensor:
        """0-based full-catalogue rank of each of this rank's ``targets`` (N,) under dot-product
        scores of its ``queries`` (N, dim), as ``trainer.evaluate.target_ranks`` ranks a dense
        score matrix (ties by item id; an excluded target is UNRANKABLE). ``exclude`` (N, L):
        item ids never ranked for that query (its history; PAD 0 is harmless), or None.
        ``complete(ids, id_rows)``: the item vectors of consecutive ``ids`` from their id rows
        (a model adds its text and attribute parts), or None for the id rows alone.
        Each rank scores every rank's queries against its own slice of rows, ``block`` rows at a
        time, and the counts of better items are summed over ranks: no rank holds more than a
        queries x ``block`` score block, and no rows move. A collective: every rank calls it.
        Equal to the dense ranking up to float rounding (an item whose score differs from the
        target's by an ulp may fall on the other side)."""
        from trainer.evaluate import UNRANKABLE

        (q, t, ex), mine = _gather_rows([queries.float(), targets[:, None].long(), _excluded(exclude, len(queries))])
        t = t[:, 0]
        first, rows = self.local_rows()
        rows = rows.detach().float()
        # Each target's score, from the rank that holds its row (the others contribute -inf).
        target_scores = torch.full((len(q),), float("-inf"))
        owned = (t >= first) & (t < first + len(rows))
        owned_ids = t[owned]
        target_rows = rows[owned_ids - first] if complete is None else complete(owned_ids, rows[owned_ids - first])
        target_scores[owned] = (q[owned] * target_rows.float()).sum(-1)
        dist.all_reduce(target_scores, op=dist.ReduceOp.MAX)
        blocked = (ex == t[:, None]).any(1) | (target_scores == float("-inf"))
        better = torch.zeros(len(q), dtype=torch.long)
        for scores, ids in _slice_scores(q, ex, first, rows, block, complete):
            above = (scores > target_scores[:, None]) | ((scores == target_scores[:, None]) & (ids < t[:, None]))
            better += (above & (ids != t[:, None])).sum(1)
        dist.all_reduce(better)
        better = torch.where(blocked, torch.full_like(better, UNRANKABLE), better)
        return better[mine].to(targets.device)

    @torch.no_grad()
    def topk(
        self, queries: torch.Tensor, k: int, exclude: torch.Tensor | None = None, block: int = 65536, complete=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, item ids), each (N, k), of the ``k`` best items for each of this rank's
        ``queries`` (ties by item id), items in ``exclude`` (N, L) left out: each rank keeps the
        top ``k`` of its slice per query, and the ranks' lists are merged (``complete``: as in
        ``target_ranks``). Items that tie with the k-th score may be kept or not, as
        ``torch.topk`` keeps them in the dense evaluator. A collective."""
        (q, ex), mine = _gather_rows([queries.float(), _excluded(exclude, len(queries))])
        k = min(k, self.num_items)
        first, rows = self.local_rows()
        best_scores = torch.full((len(q), k), float("-inf"))
        best_ids = torch.full((len(q), k), -1, dtype=torch.long)
        for scores, ids in _slice_scores(q, ex, first, rows.detach().float(), block, complete):
            # torch.topk over the block and the best so far, then the k kept ordered exactly (a
            # full sort of queries x block scores was most of an evaluation's time).
            top, pick = torch.topk(torch.cat([best_scores, scores], 1), k, dim=1)
            from_block = ids[(pick - k).clamp(min=0)]
            picked = torch.where(pick < k, best_ids.gather(1, pick.clamp(max=k - 1)), from_block)
            best_scores, best_ids = _best(top, picked, k)
        world = dist.get_world_size()
        if world > 1:
            parts_s = [torch.empty_like(best_scores) for _ in range(world)]
            parts_i = [torch.empty_like(best_ids) for _ in range(world)]
            dist.all_gather(parts_s, best_scores)
            dist.all_gather(parts_i, best_ids)
            best_scores, best_ids = _best(torch.cat(parts_s, 1), torch.cat(parts_i, 1), k)
        return best_scores[mine].to(queries.device), best_ids[mine].to(queries.device)

    @torch.no_grad()
    def load_full(self, table: torch.Tensor) -> None:
        """Set the rows from a full ``num_items x dim`` table (every rank passes the same one, or at
        least its own slice's rows): a dense checkpoint, or one saved at another world size."""
        if tuple(table.shape) != (self.num_items, self.dim):
            raise ValueError(f"table of shape {tuple(table.shape)}, expected ({self.num_items}, {self.dim})")
        first, rows = self.local_rows()
        rows.copy_(table[first : first + rows.shape[0]].to(rows))

    @torch.no_grad()
    def fill_from(self, start: int, lo: int) -> None:
        """Rows ``start..`` set to the mean of rows ``lo..start-1`` (an all-reduce over the ranks):
        the neutral start of new items without text, as trainer.checkpoint.grow_and_load gives them."""
        first, rows = self.local_rows()
        a = max(lo, first) - first
        b = max(a, min(start, first + rows.shape[0]) - first)
        total = torch.cat([rows[a:b].sum(0, dtype=torch.float64), torch.tensor([float(b - a)], dtype=torch.float64)])
        dist.all_reduce(total)
        a = max(start - first, 0)
        if a < rows.shape[0]:
            rows[a:] = (total[:-1] / total[-1]).to(rows.dtype)


def _normal_rows(rows: torch.Tensor, std: float) -> torch.Tensor:
    """TorchRec's initialisation of this rank's slice of rows. Each rank draws its own: a run seeds
    every rank alike, and the global stream would give every slice the same values (item ``i`` and
    item ``i + V / world`` would start as twins). Rank 0 draws from the global stream, so a
    one-process table starts as before."""
    rank = dist.get_rank()
    if rank == 0 or rows.device.type == "meta":  # (TorchRec also calls it on a meta copy)
        return torch.nn.init.normal_(rows, std=std)
    stream = torch.Generator(device=rows.device).manual_seed((torch.initial_seed() * 1_000_003 + rank) % 2**63)
    with torch.no_grad():
        return rows.normal_(0.0, std, generator=stream)


def _excluded(exclude: torch.Tensor | None, n: int) -> torch.Tensor:
    """(N, L) int64 ids (ids past 2**24 do not survive a float32 round trip)."""
    if exclude is None:
        return torch.full((n, 1), -1, dtype=torch.long)
    return (exclude if exclude.ndim == 2 else exclude.reshape(n, -1)).long()


def _gather_rows(parts: list[torch.Tensor]) -> tuple[list[torch.Tensor], slice]:
    """(every rank's rows of each (N_r, W) tensor in ``parts``, concatenated in rank order, and the
    slice of them that holds this rank's rows). Ranks may hold different N_r, and exclusion lists
    different W; padding is -1, which is no item id."""
    world = dist.get_world_size()
    if world == 1:
        return [p.cpu() for p in parts], slice(None)
    shapes = [None] * world
    dist.all_gather_object(shapes, [tuple(p.shape) for p in parts])
    counts = [s[0][0] for s in shapes]
    out = []
    for i, part in enumerate(parts):
        padded = torch.full((max(counts), max(s[i][1] for s in shapes)), -1, dtype=part.dtype)
        padded[: part.shape[0], : part.shape[1]] = part.cpu()
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        out.append(torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)]))
    start = sum(counts[: dist.get_rank()])
    return out, slice(start, start + counts[dist.get_rank()])


def _slice_scores(
    queries: torch.Tensor, exclude: torch.Tensor, first: int, rows: torch.Tensor, block: int, complete=None
):
    """(scores, ids) of ``queries`` against this rank's ``rows`` (ids from ``first``; completed by
    ``complete(ids, id_rows)`` when given), ``block`` rows at a time, each query's ``exclude`` ids
    at -inf."""
    for start in range(0, len(rows), block):
        ids = torch.arange(first + start, first + min(start + block, len(rows)))
        part = rows[start : start + block]
        scores = queries @ (part if complete is None else complete(ids, part).float()).T
        _mask_ids(scores, exclude, ids)
        yield scores, ids


def _mask_ids(scores: torch.Tensor, exclude: torch.Tensor, ids: torch.Tensor) -> None:
    """-inf where an id of the block (``ids``, consecutive) is in the row's ``exclude`` list."""
    inside = (exclude >= ids[0]) & (exclude <= ids[-1])
    rows, cols = inside.nonzero(as_tuple=True)
    scores[rows, exclude[rows, cols] - ids[0]] = float("-inf")


def _best(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best (score, id) per row of at least ``k`` candidates, ties to the smaller id
    (the -1 placeholders last)."""
    by_id = torch.argsort(torch.where(ids < 0, ids.max() + 1, ids), dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    return scores.gather(1, order), ids.gather(1, order)


class _quiet_torchrec:
    """TorchRec's planner warns about a hand-built topology and dry-run tensor sizes, neither of
    which applies to one table on a known device: keep its logs and warnings out of the run's."""

    def __enter__(self):
        self._logger = logging.getLogger("torchrec")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        self._logger.setLevel(self._level)
        return False
