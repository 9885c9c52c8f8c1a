"""Full-ranking evaluation of next-item prediction (never sampled negatives).

For each held-out event the scorer (a model, an ensemble or a count baseline) scores every item
of the catalogue from the history before it. The rank of the true item counts the items scored
strictly higher, plus equal scores with a smaller id (deterministic ties). Metrics: HR@K, NDCG@K
(one relevant item: 1 / log2(rank + 2)), MRR (uncut), coverage@K (share of the catalogue in
anyone's top K), and, when those heads are trained, next-event-type accuracy and value RMSE.

``exclude_seen`` removes every item of the user's history before the event (not only the visible
window) from the ranking, as the published leaders' evaluation code does. ``auto`` (the default)
decides from the data: on when fewer than ``REPEAT_SHARE_THRESHOLD`` of training events repeat an
item the user already had (excluding history then only throws away answers that are never right),
off on logs with repeat consumption (music, groceries, restaurants).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from data_sharding.loader import StreamLoader
from data_sharding.stream import ShardDataset, StreamConfig, iter_sequences
from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError
from trainer.eval_part import WHOLE, Part, merge_parts

UNRANKABLE = 2**40
"""The rank of a target that can never be recommended."""
REPEAT_SHARE_THRESHOLD = 0.05
"""exclude_seen=auto excludes history items when fewer than this share of next events repeat one."""
REPEAT_SAMPLE_EVENTS = 2_000_000
"""exclude_seen=auto measures the repeat share on at most this many training events (whole users)."""


@dataclass
class EvalConfig:
    """How validation and test scores are computed."""

    ks: list[int] = field(default_factory=lambda: [10, 20])
    batch_size: int = 256
    exclude_seen: bool | str = "auto"
    """Never recommend an item already in the user's history: true, false, or auto (true when fewer
    than 5% of training events repeat an earlier item of the same user; decided once per run and
    written to its config.yaml)."""
    online_counts: bool = True
    """Next-period scoring: count priors (model.transition_prior) also count the pairs of the
    predicted period completed before each query, as a count memory kept up to date in deployment
    does (trainer.online_pairs). Never for a stored valid/test split."""
    autocast: bool = True
    """On GPUs, run the network in bf16 autocast when scoring (item scores and ranks stay fp32)."""

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval.ks must be a non-empty list of positive integers")
        if self.exclude_seen not in (True, False, "auto"):
            raise ConfigError(f"eval.exclude_seen {self.exclude_seen!r}: choose true, false or auto")


def repeat_share(data: Path, max_events: int = REPEAT_SAMPLE_EVENTS) -> tuple[float, int]:
    """(share, events measured): of the training events that have an earlier training event of the
    same user, the share whose item the user already had. Users are read in shard order until
    ``max_events`` are counted, so the cost is bounded on any dataset."""
    repeats = total = 0
    for _, events in iter_sequences(data):
        items = events["item"][events["split"] == 0]
        if len(items) < 2:
            continue
        _, first = np.unique(items, return_index=True)
        repeats += len(items) - len(first)  # every occurrence after an item's first is a repeat
        total += len(items) - 1
        if total >= max_events:
            break
    return (repeats / total if total else 0.0), total


def resolve_exclude_seen(value: bool | str, data: Path, log=print) -> bool:
    """``eval.exclude_seen`` as a bool: ``auto`` is decided from the data's repeat share."""
    if value != "auto":
        return bool(value)
    share, measured = repeat_share(data)
    decided = share < REPEAT_SHARE_THRESHOLD
    log(
        f"eval.exclude_seen auto -> {str(decided).lower()}: {share:.1%} of {measured:,} training next events "
        f"repeat an item of the user's history (threshold {REPEAT_SHARE_THRESHOLD:.0%})"
    )
    return decided


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among (N, V) scores; ties broken by item id. A target that
    cannot be recommended (score -inf: reserved, excluded or unknown) gets UNRANKABLE: a miss at any
    K, nothing to MRR."""
    target_scores = scores.gather(1, targets[:, None])
    ids = torch.arange(scores.shape[1], device=scores.device)[None, :]
    better = (scores > target_scores) | ((scores == target_scores) & (ids < targets[:, None]))
    ranks = better.sum(dim=1)
    return torch.where(target_scores[:, 0] == float("-inf"), UNRANKABLE, ranks)


def rank_metrics(ranks: np.ndarray, ks: list[int]) -> dict[str, float]:
    """count, HR@K, NDCG@K and MRR of 0-based target ranks."""
    n = max(1, len(ranks))
    out: dict[str, float] = {"count": int(len(ranks))}
    for k in sorted(ks):
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.sum() / n)
        out[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).sum() / n)
    out["mrr"] = float((1.0 / (ranks + 1)).sum() / n)
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


class RankingMetrics:
    """Accumulates ranks and top-K sets over batches (kept per batch, so that partial metrics of
    several processes merge into exactly one process's)."""

    def __init__(self, ks: list[int], num_items: int, catalogue: int | None = None) -> None:
        self.ks = sorted(ks)
        self.num_items = num_items
        self.catalogue = catalogue if catalogue is not None else num_items - NUM_RESERVED_ITEMS
        """Items that can be recommended (coverage@K's denominator)."""
        self.ranks: dict[int, np.ndarray] = {}
        self.top = {k: np.zeros(num_items, dtype=bool) for k in self.ks}
        self.type_correct = 0
        self.type_total = 0
        self.value_sq: dict[int, float] = {}
        self.value_total = 0
        self.batch = -1
        """Index of the batch being added (its ranks and value errors are kept under it)."""

    def add(self, scores: torch.Tensor, targets: torch.Tensor, batch: int | None = None) -> None:
        # K may exceed a small catalogue: every real item is then in the top K.
        top_scores, top = torch.topk(scores, min(max(self.ks), scores.shape[1] - NUM_RESERVED_ITEMS), dim=1)
        self.add_ranks(target_ranks(scores, targets), top, top_scores, batch)

    def add_ranks(self, ranks: torch.Tensor, top: torch.Tensor, top_scores: torch.Tensor, batch: int | None) -> None:
        """A batch's target ranks and its (N, <= max K) best items with their scores."""
        self.batch = self.batch + 1 if batch is None else batch
        self.ranks[self.batch] = ranks.cpu().numpy()
        top, finite = top.cpu().numpy(), torch.isfinite(top_scores).cpu().numpy()
        for k in self.ks:  # items that cannot be recommended (-inf) are never "covered"
            self.top[k][top[:, :k][finite[:, :k]]] = True

    def add_values(self, squared_error: float, count: int) -> None:
        """The value head's squared error over ``count`` events of the current batch."""
        self.value_sq[self.batch] = self.value_sq.get(self.batch, 0.0) + squared_error
        self.value_total += count

    def merge(self, other: RankingMetrics) -> None:
        """Add another process's batches (disjoint from these)."""
        self.ranks.update(other.ranks)
        self.value_sq.update(other.value_sq)
        for k in self.ks:
            self.top[k] |= other.top[k]
        self.type_correct += other.type_correct
        self.type_total += other.type_total
        self.value_total += other.value_total

    def all_ranks(self) -> np.ndarray:
        """Ranks of every target, in batch order."""
        return np.concatenate([self.ranks[b] for b in sorted(self.ranks)]) if self.ranks else np.empty(0, np.int64)

    def result(self) -> dict[str, float]:
        out = rank_metrics(self.all_ranks(), self.ks)
        for k in self.ks:
            out[f"coverage@{k}"] = round(float(self.top[k].sum() / max(1, self.catalogue)), 6)
        if self.type_total:
            out["type_accuracy"] = round(self.type_correct / self.type_total, 6)
        if self.value_total:
            value_sq = sum(self.value_sq[b] for b in sorted(self.value_sq))
            out["value_rmse"] = round(float(np.sqrt(value_sq / self.value_total)), 6)
        return out


class Scorer(Protocol):
    """Next-item scores over the catalogue for windows that end at the event to predict."""

    num_items: int

    def __call__(
        self, batch: dict[str, torch.Tensor], rows: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """(N, V) scores of row ``rows[n]`` from the events up to position ``pos[n]`` (``mask``
        hides the event to predict, at ``pos + 1``; its time, ``batch["times"][rows, pos + 1]``,
        is the moment of the request)."""
        ...


def eval_loader(data: Path, split: str, max_len: int, batch_size: int) -> StreamLoader:
    """Every held-out event of ``split`` once, in a fixed order (single process)."""
    cfg = StreamConfig(max_len=max_len, batch_size=batch_size, split=split, shuffle=False, generations="state")
    return StreamLoader(ShardDataset(data, cfg))


def held_out(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, pos, targets, history mask) of windows that end at the event to predict: ``pos`` is
    the position just before it, and the mask hides it so the model cannot see what it predicts."""
    pos = batch["mask"].sum(dim=1) - 2
    rows = torch.arange(len(pos), device=pos.device)
    mask = batch["mask"].clone()
    mask[rows, pos + 1] = False
    return rows, pos, batch["items"][rows, pos + 1], mask


def exclude_history(scores: torch.Tensor, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
    """Set the scores of the user's earlier items to -inf: the whole history when the batch carries
    it (``seen``), else the visible window."""
    seen = batch["seen"] if "seen" in batch else torch.where(mask, batch["items"], torch.zeros_like(batch["items"]))
    scores.scatter_(1, seen, float("-inf"))


class ModelScorer:
    """A BehaviorGPT's next-item scores, or an ensemble's: the mean of the members'
    log-probabilities over the catalogue (a product of experts, so members whose raw scores differ
    in scale count equally)."""

    def __init__(self, model) -> None:
        self.models = list(model) if isinstance(model, (list, tuple)) else [model]
        self.num_items = self.models[0].num_items
        with torch.no_grad(), eval_mode(self.models):  # as scored: no id dropout, no graph kept
            self.tables = [m.items.table() for m in self.models]
        self.hidden: torch.Tensor | None = None

    def __call__(self, batch, rows, pos, mask) -> torch.Tensor:
        inputs = {**batch, "mask": mask}
        states = [m.query_states(inputs, t, rows, pos) for m, t in zip(self.models, self.tables, strict=True)]
        items, visible = batch["items"][rows], mask[rows]
        at = batch["times"][rows, pos + 1]
        scores = [
            m.next_item_scores(h, t, items, visible, pos, at)
            for m, h, t in zip(self.models, states, self.tables, strict=True)
        ]
        if len(self.models) == 1:
            self.hidden = states[0]
            return scores[0]
        return torch.stack([torch.log_softmax(x, dim=1) for x in scores]).mean(dim=0)

    def observe(self, pairs) -> None:
        """Count the predicted period's pairs (trainer.online_pairs.PeriodPairs; None: stop) in the
        members' transition priors."""
        for m in self.models:
            if m.prior is not None:
                m.prior.online = None if pairs is None else pairs.get(m.prior.steps)
            if m.trend is not None:
                m.trend.observe(None if pairs is None else pairs.events())

    def side_metrics(self, metrics: RankingMetrics, batch, rows, pos) -> None:
        """Next-event-type accuracy and value error (one model only: the side heads are per model)."""
        if len(self.models) == 1:
            _add_side_metrics(self.models[0], metrics, self.hidden, batch, rows, pos)


@contextlib.contextmanager
def eval_mode(model):
    """Models (one or a list) in eval mode for the duration, restored afterwards."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was_training, strict=True):
            m.train(training)


@torch.no_grad()
def rank_batches(
    scorers: dict[str, Scorer],
    batches,
    cfg: EvalConfig,
    device: torch.device,
    rankable: dict[str, torch.Tensor | None] | None = None,
    ranks: bool = False,
    catalogue: int | None = None,
    part: Part = WHOLE,
) -> dict[str, dict]:
    """Full-ranking metrics of every scorer over the same collated windows, each ending at the event
    to predict (the last real position). A target that can never be ranked (a reserved id such as
    UNK for an item unknown to the model, or an item outside the scorer's ``rankable`` (V,) mask)
    counts as a miss. Returns {name: metrics}; with ``ranks``, each also holds the 0-based rank of
    every target in batch order (for breakdowns and paired tests). ``catalogue``: the number of
    items coverage@K is a share of (default: all real items). ``part``: score only this process's
    batches and merge every process's (distributed evaluation; every batch is still read)."""
    if cfg.exclude_seen == "auto":
        raise ConfigError("eval.exclude_seen=auto must be resolved on the data first (resolve_exclude_seen)")

    def fresh() -> dict[str, RankingMetrics]:
        return {name: RankingMetrics(cfg.ks, scorer.num_items, catalogue) for name, scorer in scorers.items()}

    metrics = fresh()
    blocked = {name: None if mask is None else ~mask.to(device) for name, mask in (rankable or {}).items()}
    read, unowned = 0, None
    for index, batch in enumerate(batches):
        read = index + 1
        if part.owns(index):
            _score_batch(scorers, batch, index, metrics, blocked, cfg, device)
        else:
            unowned = batch
    if part.collective and part.idles_last_round(read):  # the other ranks' last forward: join it
        _score_batch(scorers, unowned, read, fresh(), blocked, cfg, device)
    merge_parts(metrics, part)
    results = {}
    for name, accumulated in metrics.items():
        results[name] = accumulated.result()
        if ranks:
            results[name]["ranks"] = accumulated.all_ranks()
    return results


def _score_batch(scorers: dict, batch: dict, index: int, metrics: dict, blocked: dict, cfg, device) -> None:
    """Rank one batch's held-out events by every scorer into ``metrics`` (rank_batches)."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and cfg.autocast)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    rows, pos, targets, mask = held_out(batch)
    for name, scorer in scorers.items():
        with autocast:
            scores = scorer(batch, rows, pos, mask).float()
        if blocked.get(name) is not None:
            scores[:, blocked[name]] = float("-inf")
        if cfg.exclude_seen:
            exclude_history(scores, batch, mask)
        metrics[name].add(scores, targets, index)
        side = getattr(scorer, "side_metrics", None)
        if side is not None:
            with autocast:
                side(metrics[name], batch, rows, pos)


def evaluate_batches(
    model,
    batches,
    cfg: EvalConfig,
    device: torch.device,
    rankable: torch.Tensor | None = None,
    ranks: bool = False,
    part: Part = WHOLE,
) -> dict:
    """:func:`rank_batches` for a BehaviorGPT, or a list of them scored as an ensemble (next-item
    metrics only; the side heads are per model)."""
    with eval_mode(model):
        scorers = {"model": ModelScorer(model)}
        return rank_batches(scorers, batches, cfg, device, {"model": rankable}, ranks, part=part)["model"]


def evaluate_model(
    model, data: Path, split: str, cfg: EvalConfig, max_len: int, device: torch.device, part: Part = WHOLE
) -> dict:
    """Full-ranking metrics of ``model`` (a BehaviorGPT, or a list of them: an ensemble) on the
    ``split`` events of ``data`` (``part``: this process's share, merged; see :class:`Part`)."""
    return evaluate_batches(model, eval_loader(data, split, max_len, cfg.batch_size), cfg, device, part=part)


class InferenceScorer:
    """Scores of an :class:`trainer.inference.InferenceModel` (an export, int8 or not)."""

    def __init__(self, model) -> None:
        self.model = model
        self.num_items = model.num_items

    def __call__(self, batch, rows, pos, mask) -> torch.Tensor:
        times = batch["times"]
        at = times[rows, pos + 1]
        hidden = self.model.encode(batch["items"], batch["types"], times, mask, at)
        context = (batch["items"][rows], mask[rows], pos)
        scores = self.model.scores(hidden, context, at - times[rows, pos], at)
        return scores.clone()  # an inference-mode tensor: the ranking code edits it in place


def evaluate_inference(model, data: Path, split: str, cfg: EvalConfig) -> dict:
    """The same protocol for an :class:`trainer.inference.InferenceModel`."""
    cfg = replace(cfg, exclude_seen=resolve_exclude_seen(cfg.exclude_seen, data, log=lambda *a: None))
    batches = eval_loader(data, split, model.max_len, cfg.batch_size)
    return rank_batches({"model": InferenceScorer(model)}, batches, cfg, torch.device("cpu"))["model"]


def _add_side_metrics(model, metrics: RankingMetrics, hidden, batch, rows, pos) -> None:
    heads = model.heads
    if heads.type_head is not None:
        predicted = heads.type_head(hidden).argmax(dim=1)
        metrics.type_correct += int((predicted == batch["types"][rows, pos + 1]).sum())
        metrics.type_total += len(rows)
    if heads.value_head is not None:
        # Every row through the head (no branch on the data: under ZeRO-3 each head's forward is
        # a collective every rank must run), errors counted where a value exists.
        has = batch["has_value"][rows, pos + 1]
        err = heads.value_head(hidden).squeeze(-1).float() - batch["values"][rows, pos + 1]
        if has.any():
            metrics.add_values(float((err[has] ** 2).sum()), int(has.sum()))
