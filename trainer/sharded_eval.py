"""Full-ranking evaluation of a model whose item table is sharded over the ranks (issue 20).

The dense evaluator (trainer.evaluate.rank_batches) scores each batch against the whole ``V x H``
table in one process. Here no process holds the table: each rank scores its batches' queries
(``Part``: the batches ``rank``, ``rank + world``, ...) and every rank ranks all ranks' queries
against its own slice of the catalogue, a bounded block at a time
(``ShardedItemTable.target_ranks`` / ``topk``). The lookups and the ranking are collectives, so
the ranks go through the batches in rounds of ``world`` batches, one each (a rank without a batch
in the last round takes part with none). The metrics are the dense evaluator's: the same target
ranks (up to float rounding of scores that tie within an ulp), top-K coverage and side heads,
merged over ranks in batch order.
"""

from __future__ import annotations

import torch

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError
from trainer.eval_part import WHOLE, Part, merge_parts
from trainer.evaluate import EvalConfig, RankingMetrics, _add_side_metrics, eval_mode, held_out


@torch.no_grad()
def evaluate_sharded(
    model, batches, cfg: EvalConfig, device: torch.device, part: Part = WHOLE, catalogue: int | None = None
) -> dict:
    """Next-item metrics of ``model`` (a BehaviorGPT with ``items.sharded``) over ``batches`` (every
    rank iterates the same batches), as trainer.evaluate.evaluate_batches reports them."""
    if cfg.exclude_seen == "auto":
        raise ConfigError("eval.exclude_seen=auto must be resolved on the data first (resolve_exclude_seen)")
    metrics = RankingMetrics(cfg.ks, model.num_items, catalogue)
    pending, index = None, -1
    with eval_mode(model):
        for index, batch in enumerate(batches):
            if part.owns(index):
                pending = (index, batch)
            if (index + 1) % part.world == 0:
                _round(model, pending, cfg, device, metrics)
                pending = None
        if (index + 1) % part.world != 0:  # the last, partial round
            _round(model, pending, cfg, device, metrics)
    found = {"model": metrics}
    merge_parts(found, part)
    return found["model"].result()


def _round(model, pending, cfg: EvalConfig, device: torch.device, metrics: RankingMetrics) -> None:
    """One batch of this rank (or none) through the collective lookup and ranking."""
    table = model.items.sharded
    reserved = torch.arange(NUM_RESERVED_ITEMS, device=device)
    if pending is None:
        model.items.table(torch.zeros(1, dtype=torch.long, device=device))  # take part in the lookup
        states = torch.empty(0, table.dim, device=device)
        targets = torch.empty(0, dtype=torch.long, device=device)
        exclude = reserved[None, :0]
    else:
        batch = {k: v.to(device, non_blocking=True) for k, v in pending[1].items()}
        rows, pos, targets, mask = held_out(batch)
        inputs = {**batch, "mask": mask}
        states = model.query_states(inputs, model.items.table(torch.unique(batch["items"])), rows, pos)
        # Reserved ids are never recommended; with exclude_seen, neither is the user's history.
        exclude = reserved.expand(len(rows), -1)
        if cfg.exclude_seen:
            seen = batch["seen"] if "seen" in batch else torch.where(mask, batch["items"], 0)
            exclude = torch.cat([exclude, seen], 1)
    # Item vectors as the dense table builds them (id row + text + attributes), a block at a time.
    ranks = table.target_ranks(states, targets, exclude, complete=model.items.complete)
    k_max = min(max(metrics.ks), model.num_items - NUM_RESERVED_ITEMS)
    top_scores, top = table.topk(states, k_max, exclude, complete=model.items.complete)
    if pending is not None:
        metrics.add_ranks(ranks, top, top_scores, pending[0])
        _add_side_metrics(model, metrics, states, batch, rows, pos)
