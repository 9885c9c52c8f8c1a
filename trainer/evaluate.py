"""Full-ranking evaluation of next-item prediction (never sampled negatives).

For each held-out event (the valid or test split stored in the shards) the model scores every
item of the catalogue from the history before it. The rank of the true item counts the items
scored strictly higher, plus equal scores with a smaller id (deterministic ties). Metrics:
HR@K, NDCG@K (one relevant item: 1 / log2(rank + 2)), MRR (uncut), coverage@K (share of the
catalogue in anyone's top K), and, when those heads are trained, next-event-type accuracy and
value RMSE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from data_sharding.stream import ShardDataset, StreamConfig, StreamLoader, iter_sequences
from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError


@dataclass
class EvalConfig:
    """How validation and test scores are computed."""

    ks: list[int] = field(default_factory=lambda: [10, 20])
    batch_size: int = 256
    exclude_seen: bool = False
    """Never recommend an item already in the user's history (some papers' protocol; off by default)."""

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ConfigError("eval.ks must be a non-empty list of positive integers")


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target among (N, V) scores; ties broken by item id."""
    target_scores = scores.gather(1, targets[:, None])
    ids = torch.arange(scores.shape[1], device=scores.device)[None, :]
    better = (scores > target_scores) | ((scores == target_scores) & (ids < targets[:, None]))
    return better.sum(dim=1)


class RankingMetrics:
    """Accumulates ranks and top-K sets over batches."""

    def __init__(self, ks: list[int], num_items: int) -> None:
        self.ks = sorted(ks)
        self.num_items = num_items
        self.ranks: list[np.ndarray] = []
        self.top = {k: np.zeros(num_items, dtype=bool) for k in self.ks}
        self.type_correct = 0
        self.type_total = 0
        self.value_sq = 0.0
        self.value_total = 0

    def add(self, scores: torch.Tensor, targets: torch.Tensor) -> None:
        self.ranks.append(target_ranks(scores, targets).cpu().numpy())
        # K may exceed a small catalogue: every real item is then in the top K.
        k_max = min(max(self.ks), scores.shape[1] - NUM_RESERVED_ITEMS)
        top = torch.topk(scores, k_max, dim=1).indices.cpu().numpy()
        for k in self.ks:
            self.top[k][top[:, :k].ravel()] = True

    def result(self) -> dict[str, float]:
        ranks = np.concatenate(self.ranks) if self.ranks else np.empty(0)
        n = max(1, len(ranks))
        out: dict[str, float] = {"count": int(len(ranks))}
        for k in self.ks:
            hit = ranks < k
            out[f"hr@{k}"] = float(hit.sum() / n)
            out[f"ndcg@{k}"] = float((hit / np.log2(ranks + 2)).sum() / n)
            out[f"coverage@{k}"] = float(self.top[k].sum() / max(1, self.num_items - NUM_RESERVED_ITEMS))
        out["mrr"] = float((1.0 / (ranks + 1)).sum() / n)
        if self.type_total:
            out["type_accuracy"] = self.type_correct / self.type_total
        if self.value_total:
            out["value_rmse"] = float(np.sqrt(self.value_sq / self.value_total))
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in out.items()}


def eval_loader(data: Path, split: str, max_len: int, batch_size: int) -> StreamLoader:
    """Every held-out event of ``split`` once, in a fixed order (single process)."""
    cfg = StreamConfig(max_len=max_len, batch_size=batch_size, split=split, shuffle=False, generations="state")
    return StreamLoader(ShardDataset(data, cfg))


def _held_out(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, pos, targets, history mask) of windows that end at the event to predict: ``pos`` is
    the position just before it, and the mask hides it so the model cannot see what it predicts."""
    pos = batch["mask"].sum(dim=1) - 2
    rows = torch.arange(len(pos), device=pos.device)
    mask = batch["mask"].clone()
    mask[rows, pos + 1] = False
    return rows, pos, batch["items"][rows, pos + 1], mask


def _exclude_seen(scores: torch.Tensor, items: torch.Tensor, mask: torch.Tensor) -> None:
    scores.scatter_(1, torch.where(mask, items, torch.zeros_like(items)), float("-inf"))


def evaluate_model(model, data: Path, split: str, cfg: EvalConfig, max_len: int, device: torch.device) -> dict:
    """Full-ranking metrics of ``model`` (a BehaviorGPT, or a list of them: an ensemble) on the
    ``split`` events of ``data``."""
    return evaluate_batches(model, eval_loader(data, split, max_len, cfg.batch_size), cfg, device)


@torch.no_grad()
def evaluate_batches(
    model, batches, cfg: EvalConfig, device: torch.device, known_items: int | None = None, ranks: bool = False
) -> dict:
    """Full-ranking metrics over collated windows that each end at the event to predict (the last
    real position); the model sees only the events before it. A reserved target id (e.g. UNK for
    an item the model never saw) can never be ranked: it counts as a miss. ``known_items``: only
    ids below it may be recommended (a model evaluated on a catalogue grown after it trained).
    ``model`` may be a list of models trained on the same data: their ensemble is scored (next-item
    metrics only; the side heads are per model)."""
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    tables = [m.items.table() for m in models]
    metrics = RankingMetrics(cfg.ks, models[0].num_items)
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        rows, pos, targets, mask = _held_out(batch)
        hidden = [m.hidden_states({**batch, "mask": mask}, t)[rows, pos] for m, t in zip(models, tables, strict=True)]
        scores = [m.heads.item_scores(h, t) for m, h, t in zip(models, hidden, tables, strict=True)]
        if len(models) == 1:
            scores = scores[0]
            _add_side_metrics(models[0], metrics, hidden[0], batch, rows, pos)
        else:
            # The mean of the members' log-probabilities over the catalogue (a product of experts,
            # so members whose raw scores differ in scale count equally).
            scores = torch.stack([torch.log_softmax(x, dim=1) for x in scores]).mean(dim=0)
        if known_items is not None:
            scores[:, known_items:] = float("-inf")
        if cfg.exclude_seen:
            _exclude_seen(scores, batch["items"], mask)
        metrics.add(scores, targets)
    for m, training in zip(models, was_training, strict=True):
        m.train(training)
    result = metrics.result()
    if ranks:  # 0-based rank of every target, in batch order (for paired significance tests)
        result["ranks"] = np.concatenate(metrics.ranks) if metrics.ranks else np.empty(0, np.int64)
    return result


@torch.no_grad()
def evaluate_inference(model, data: Path, split: str, cfg: EvalConfig) -> dict:
    """The same protocol for an :class:`trainer.inference.InferenceModel` (an export, int8 or not)."""
    metrics = RankingMetrics(cfg.ks, model.num_items)
    for batch in eval_loader(data, split, model.max_len, cfg.batch_size):
        _, _, targets, mask = _held_out(batch)
        scores = model.scores(model.encode(batch["items"], batch["types"], batch["times"], mask))
        if cfg.exclude_seen:
            _exclude_seen(scores, batch["items"], mask)
        metrics.add(scores, targets)
    return metrics.result()


def _add_side_metrics(model, metrics: RankingMetrics, hidden, batch, rows, pos) -> None:
    heads = model.heads
    if heads.type_head is not None:
        predicted = heads.type_head(hidden).argmax(dim=1)
        metrics.type_correct += int((predicted == batch["types"][rows, pos + 1]).sum())
        metrics.type_total += len(rows)
    if heads.value_head is not None:
        has = batch["has_value"][rows, pos + 1]
        if has.any():
            err = heads.value_head(hidden[has]).squeeze(-1) - batch["values"][rows, pos + 1][has]
            metrics.value_sq += float((err**2).sum())
            metrics.value_total += int(has.sum())


def train_item_counts(data: Path, num_items: int) -> np.ndarray:
    """Events per item in the training split only (what a popularity model may know)."""
    counts = np.zeros(num_items, dtype=np.int64)
    for _, events in iter_sequences(data):
        train = events["item"][events["split"] == 0]
        counts += np.bincount(train, minlength=num_items)
    return counts


def evaluate_popularity(data: Path, split: str, cfg: EvalConfig, num_items: int, max_len: int = 50) -> dict:
    """The same protocol for "recommend the most popular training items to everyone".

    ``max_len`` is the visible history (what ``exclude_seen`` removes), as for a model's window.
    """
    counts = torch.from_numpy(train_item_counts(data, num_items).astype(np.float32))
    counts[:NUM_RESERVED_ITEMS] = float("-inf")
    metrics = RankingMetrics(cfg.ks, num_items)
    for batch in eval_loader(data, split, max_len, cfg.batch_size):
        last = batch["mask"].sum(1) - 1
        rows = torch.arange(len(last))
        targets = batch["items"][rows, last]
        scores = counts.expand(len(targets), -1).clone()
        if cfg.exclude_seen:
            history = batch["items"].clone()
            history[rows, last] = 0  # the held-out event itself is not history
            scores.scatter_(1, history, float("-inf"))
        metrics.add(scores, targets)
    return metrics.result()
