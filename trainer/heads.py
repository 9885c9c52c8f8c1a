"""Multi-task heads and their losses: next item, next event type, time to next event, value.

Next item: scores = hidden . item vectors (the same vectors that embed the input, i.e. tied).
Up to ``full_softmax_max_items`` the loss is a full softmax over the catalogue, computed in
chunks by a custom autograd function that never materialises the (positions x catalogue)
score matrix: allocating it afresh every step costs more in page faults than the matmul.
Above the threshold, a sampled softmax over in-batch targets plus uniform negatives, with
logQ correction, keeps catalogues of millions of items trainable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError


@dataclass
class HeadsConfig:
    """Which predictions to train, and how much each counts (a weight of 0 switches a head off)."""

    item_weight: float = 1.0
    type_weight: float = 0.1
    time_weight: float = 0.1
    value_weight: float = 0.1
    item_loss: str = "auto"
    """full (softmax over the catalogue), sampled, or auto (full up to full_softmax_max_items)."""
    full_softmax_max_items: int = 200_000
    num_negatives: int = 1024
    """Uniform negatives per step for the sampled softmax (shared by the batch)."""
    in_batch_negatives: bool = True
    """Sampled softmax: also rank each target against the batch's other targets (popular items,
    logQ-corrected). False: uniform negatives only (the published SASRec+SS recipe)."""
    chunk_mb: int = 32
    """Size of one block of scores in the chunked full softmax."""
    sync_free: bool | None = None
    """Every position is a loss row (weight 0 where the next event is no target), so a step never
    waits for the device (no data-dependent shape). None: on a GPU with packed batches in which
    every event is a target (RunConfig.sync_free_step), where such a wait stalls the queue and
    nearly every position is a target anyway; off on CPU, where gathering the target positions
    first computes fewer rows and a sync costs nothing."""

    def __post_init__(self) -> None:
        if self.item_loss not in ("auto", "full", "sampled"):
            raise ConfigError(f"heads.item_loss {self.item_loss!r}: choose auto, full or sampled")
        if min(self.item_weight, self.type_weight, self.time_weight, self.value_weight) < 0:
            raise ConfigError("head weights must be >= 0")

    def sampled_for(self, num_items: int) -> bool:
        """Whether the next-item loss is the sampled softmax for a catalogue of ``num_items``."""
        return self.item_loss == "sampled" or (self.item_loss == "auto" and num_items > self.full_softmax_max_items)


def time_bucket(gap_ms: torch.Tensor, buckets: int) -> torch.Tensor:
    """Bucket = floor(log2(seconds + 1)), clipped: 0 s -> 0, 1 min -> 5, 1 day -> 16, 1 year -> 24."""
    seconds = gap_ms.clamp(min=0).double() / 1000.0
    return torch.log2(seconds + 1).floor().long().clamp(0, buckets - 1)


def _mask_reserved(scores: torch.Tensor) -> torch.Tensor:
    scores[:, :NUM_RESERVED_ITEMS] = float("-inf")
    return scores


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (B * T, ...): one row per position."""
    return x.reshape(-1, *x.shape[2:])


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 when it is a 16-bit float (fp32 and fp64 stay as they are)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def fp32_scores(h: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(N, C) item scores h @ vectors.T in fp32 whatever the inputs' dtype (bf16 under autocast or
    DeepSpeed's bf16 weights): catalogue-sized score rows feed a log-sum-exp and a ranking, where
    bf16's 8 bits of mantissa would round logits of 16-32 to steps of 0.125-0.25 and tie
    neighbours. On GPUs the product runs in TF32 (enabled by trainer.runtime)."""
    with torch.autocast(h.device.type, enabled=False):
        return _wide(h) @ _wide(vectors).T


class ChunkedSoftmaxCE(torch.autograd.Function):
    """Sum over rows of cross-entropy(h @ table.T [+ score priors' offsets], target) [x the row's
    ``row_weight``, (N,), or None for 1], computed ``chunk`` rows at a time.

    Saves only h, table, targets and the per-row log-sum-exp; backward recomputes each block.
    ``priors``: (prior, per-row inputs) pairs (trainer.priors: the transition and repeat priors);
    each adds its offsets to every block at its rows' weights (``weights``, in the same order: each
    prior's ``row_weights``, (N, k)), which get their gradient.

    Precision: scores, log-sum-exp, softmax and the table's gradient are fp32 whatever the inputs'
    dtype (bf16 hidden states under autocast, bf16 weights under DeepSpeed), with autocast off
    inside, forward and backward alike (what ``torch.amp.custom_fwd(cast_inputs=float32)`` and
    ``custom_bwd`` do, for any device); gradients return in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, h, table, targets, chunk, priors, row_weight, *weights) -> torch.Tensor:
        ctx.dtypes = (h.dtype, table.dtype)
        with torch.autocast(h.device.type, enabled=False):
            h, table = _wide(h), _wide(table)
            lse = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                block = h[rows] @ table.T  # (c, V)
                for (prior, inputs), w in zip(priors, weights, strict=True):
                    prior.add_training_offsets(block, inputs[rows], targets[rows], w[rows])
                lse[rows] = torch.logsumexp(_mask_reserved(block), dim=1)
            target_scores = (h * table[targets]).sum(dim=1)
            for (prior, inputs), w in zip(priors, weights, strict=True):
                target_scores = target_scores + prior.offsets(inputs, targets[:, None], targets, w)[:, 0]
            rows_loss = lse - target_scores
            if row_weight is not None:
                rows_loss = rows_loss * row_weight.to(h.dtype)
        ctx.save_for_backward(h, table, targets, lse, row_weight, *weights)
        ctx.chunk, ctx.priors = chunk, priors
        return rows_loss.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, table, targets, lse, row_weight, *weights = ctx.saved_tensors
        with torch.autocast(h.device.type, enabled=False):
            grad = grad.to(h.dtype)
            # Each row's factor: the output's gradient times the row's weight.
            scale = grad if row_weight is None else (grad * row_weight.to(h.dtype))[:, None]
            grad_h = torch.empty_like(h)
            grad_table = torch.zeros_like(table)
            grad_weights = [torch.zeros_like(w, dtype=h.dtype) for w in weights]
            for start in range(0, h.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                hc = h[rows]
                block = hc @ table.T
                for (prior, inputs), w in zip(ctx.priors, weights, strict=True):
                    prior.add_training_offsets(block, inputs[rows], targets[rows], w[rows], keep=True)
                probs = torch.exp(_mask_reserved(block) - lse[rows, None])  # softmax
                probs[torch.arange(len(hc), device=h.device), targets[rows]] -= 1.0
                probs *= scale if row_weight is None else scale[rows]
                grad_h[rows] = probs @ table
                grad_table.addmm_(probs.T, hc)
                for g, (prior, inputs) in zip(grad_weights, ctx.priors, strict=True):
                    g[rows] += prior.training_weight_grad(inputs[rows], targets[rows], probs)
        grads = [g.to(w.dtype) for g, w in zip(grad_weights, weights, strict=True)]
        h_dtype, table_dtype = ctx.dtypes
        return grad_h.to(h_dtype), grad_table.to(table_dtype), None, None, None, None, *grads


class MultiTaskHeads(nn.Module):
    def __init__(
        self,
        cfg: HeadsConfig,
        hidden: int,
        num_items: int,
        num_event_types: int,
        time_buckets: int,
        item_counts: np.ndarray,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_items = num_items
        self.sampled = cfg.sampled_for(num_items)
        self.type_head = nn.Linear(hidden, num_event_types) if cfg.type_weight > 0 else None
        self.time_head = nn.Linear(hidden, time_buckets) if cfg.time_weight > 0 else None
        self.value_head = nn.Linear(hidden, 1) if cfg.value_weight > 0 else None
        # Popularity for the logQ correction of in-batch negatives.
        freq = np.asarray(item_counts, dtype=np.float64) + 1e-9
        freq[:NUM_RESERVED_ITEMS] = 0
        self.register_buffer("log_freq", torch.from_numpy(np.log(freq / freq.sum() + 1e-20)).float(), persistent=False)

    def draw_negatives(self, device) -> torch.Tensor:
        """The sampled softmax's uniform negatives of one step, shared by the batch."""
        return torch.randint(NUM_RESERVED_ITEMS, self.num_items, (self.cfg.num_negatives,), device=device)

    def item_loss(
        self,
        h: torch.Tensor,
        targets: torch.Tensor,
        table: torch.Tensor,
        priors: list | None = None,
        negatives: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
        dedupe: bool = False,
    ) -> torch.Tensor:
        """Next-item loss over rows of h (N, H) with targets (N,): the mean, or with ``weight`` (N,)
        (1 for a target, 0 for a position that is not one) the weighted mean; a row of weight 0 is
        no in-batch negative either. ``priors``: (score prior, its (N, ...) inputs for these rows)
        pairs (trainer.priors); ``negatives``: the sampled softmax's draw (drawn here when not
        given). No host synchronisation: every shape follows the inputs' shapes, unless
        ``dedupe`` (every row a target): the sampled softmax then scores each distinct id once,
        the same loss with fewer columns for the priors to fill (a sync, for CPU steps)."""
        priors = priors or []
        weights = [prior.row_weights(h) for prior, _ in priors]  # (N, k) each: per query with a gate
        count = torch.tensor(float(len(targets)), device=h.device) if weight is None else weight.sum()
        if not self.sampled:
            chunk = max(1, (self.cfg.chunk_mb << 20) // (4 * self.num_items))
            total = ChunkedSoftmaxCE.apply(h, table, targets, chunk, priors, weight, *weights)
            return total / count.clamp(min=1)
        if negatives is None:
            negatives = self.draw_negatives(h.device)
        if not self.cfg.in_batch_negatives:
            # Column 0: the row's own target; then the shared uniform draws, a draw of the target
            # itself masked out (uniform sampling needs no logQ correction).
            positive = (_wide(h) * _wide(table[targets])).sum(dim=1, keepdim=True)
            drawn = fp32_scores(h, table[negatives]).masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
            scores = torch.cat([positive, drawn], dim=1)
            columns = torch.cat([targets[:, None], negatives.expand(len(targets), -1)], dim=1)
            own = torch.zeros_like(targets)
        elif dedupe:
            scores, columns, own = self._unique_in_batch_scores(h, targets, table, negatives, count)
        else:
            scores, columns = self._in_batch_scores(h, targets, table, negatives, count, weight)
            own = torch.arange(len(targets), device=h.device)
        for (prior, inputs), w in zip(priors, weights, strict=True):
            scores = scores + prior.offsets(inputs, columns, targets, w)
        losses = F.cross_entropy(scores, own, reduction="none")
        return losses.mean() if weight is None else (losses * weight).sum() / count.clamp(min=1)

    def _in_batch_scores(self, h, targets, table, negatives, count, weight) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, N + K) logQ-corrected scores of every row against the batch's targets (row n's own
        target in column n) and the K uniform draws, and the (N + K,) column ids. Each draw is its
        own column (duplicates included, as a sampled softmax with replacement counts them), with
        its expected count as q; a column holding the row's target anywhere but in its own place
        (an accidental hit) is masked, and so is the target column of a row of weight 0."""
        columns = torch.cat([targets, negatives])
        scores = fp32_scores(h, table[columns]) - self._log_q(columns, count)
        n = len(targets)
        own = torch.eye(n, n + len(negatives), dtype=torch.bool, device=h.device)
        drop = columns[None, :] == targets[:, None]
        if weight is not None:
            drop = drop | F.pad(weight == 0, (0, len(negatives)))[None, :]
        return scores.masked_fill(drop & ~own, float("-inf")), columns

    def _unique_in_batch_scores(self, h, targets, table, negatives, count):
        """What :meth:`_in_batch_scores` computes for rows that are all targets, one column per
        distinct id: a column drawn m times adds log m (its m equal terms of the softmax), except
        in the row whose target it is, where only the row's own draw counts (the others are
        accidental hits). Returns (scores, the distinct ids, each row's target column)."""
        columns, inverse, drawn = torch.unique(torch.cat([targets, negatives]), return_inverse=True, return_counts=True)
        own = inverse[: len(targets)]
        is_own = torch.arange(len(columns), device=h.device)[None, :] == own[:, None]
        repeats = torch.where(is_own, 0.0, torch.log(drawn.to(torch.float32))[None, :])
        return fp32_scores(h, table[columns]) - self._log_q(columns, count) + repeats, columns, own

    def _log_q(self, columns: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """logQ of each candidate id: its expected draws per step, as one of the ``count`` in-batch
        targets (popularity) plus the uniform negatives."""
        uniform = self.cfg.num_negatives / (self.num_items - NUM_RESERVED_ITEMS)
        return torch.log(count * self.log_freq[columns].exp() + uniform)

    def losses(
        self,
        h: torch.Tensor,
        batch: dict[str, torch.Tensor],
        table: torch.Tensor,
        item_states: torch.Tensor | None = None,
        priors: list | None = None,
        negatives: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """h: (B, T-1, H) states at positions 0..T-2, each predicting the event after it;
        ``item_states``: the states that score the next item, when they differ from h (conditioned
        on the prediction time); ``priors``: score priors (trainer.priors), each reading its own
        per-position inputs from the batch; ``negatives``: the sampled softmax's draw.

        With ``heads.sync_free`` every position is a row, weighted 1 when its next event is a
        target and 0 otherwise: no host synchronisation, the same losses and gradients. Without
        it, the target positions alone are gathered first (one host synchronisation; the cheaper
        step where one costs nothing, on CPU, and where few positions are targets)."""
        # Positions whose next event is a training target (incremental runs: only the new events
        # and the replay sample; otherwise every real event).
        valid = batch["mask"][:, 1:] & batch["targets"][:, 1:] if "targets" in batch else batch["mask"][:, 1:]
        out: dict[str, torch.Tensor] = {"targets": valid.sum()}
        weight = valid.reshape(-1)
        pick, gathered = _rows, False
        if not self.sync_free(h.device) and bool(weight.any()):  # no target at all: every row, weight 0
            keep = weight.nonzero()[:, 0]
            weight, pick, gathered = weight[keep], lambda x: _rows(x)[keep], True
        weight = weight.to(torch.float32)
        count = weight.sum().clamp(min=1)
        hv = pick(h)  # (N, H)
        total = torch.zeros((), device=h.device)
        if self.cfg.item_weight > 0:
            item_h = hv if item_states is None else pick(item_states)
            inputs = [(prior, pick(prior.training_inputs(batch))) for prior in priors or []]
            targets = pick(batch["items"][:, 1:])
            out["item"] = self.item_loss(item_h, targets, table, inputs, negatives, weight, dedupe=gathered)
            total = total + self.cfg.item_weight * out["item"]
        if self.type_head is not None:
            losses = F.cross_entropy(self.type_head(hv), pick(batch["types"][:, 1:]), reduction="none")
            out["type"] = (losses * weight).sum() / count
            total = total + self.cfg.type_weight * out["type"]
        if self.time_head is not None:
            gaps = batch["times"][:, 1:] - batch["times"][:, :-1]
            buckets = time_bucket(pick(gaps), self.time_head.out_features)
            losses = F.cross_entropy(self.time_head(hv), buckets, reduction="none")
            out["time"] = (losses * weight).sum() / count
            total = total + self.cfg.time_weight * out["time"]
        if self.value_head is not None:
            # Masked mean over every row: the head is in the graph even for a batch without values
            # (a zero gradient then), so distributed ranks always agree on which weights have one.
            has_value = pick(batch["has_value"][:, 1:]).float() * weight
            err = (self.value_head(hv).squeeze(-1) - pick(batch["values"][:, 1:])) ** 2 * has_value
            out["value"] = err.sum() / has_value.sum().clamp(min=1)
            total = total + self.cfg.value_weight * out["value"]
        out["loss"] = total
        return out

    def sync_free(self, device: torch.device) -> bool:
        """Whether this step computes every position (heads.sync_free; auto: on a GPU)."""
        return self.cfg.sync_free if self.cfg.sync_free is not None else device.type == "cuda"

    @staticmethod
    def item_scores(h: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(N, V) next-item scores (fp32); reserved ids can never be recommended."""
        return _mask_reserved(fp32_scores(h, table))
