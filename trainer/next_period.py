"""Next-period evaluation: trained on everything up to now, predict what users do next.

A *period* is the set of events to predict: one generation's new events (by default the newest
generation of a dataset with several), a time range ``[from, to)``, or the stored valid/test split
(leave-one-out or ``--split time``). Every event of the period whose user has at least one earlier
event is predicted from the events before it: earlier events of the same period are context
(read, never trained on). A user's very first event has nothing to predict from and is counted
apart (``without_context``).

Every scorer - a run, an ensemble, a count baseline (trainer.baselines) - knows only the events
before the period: runs were trained on them, baselines are fit on them here, and all are ranked
by the same loop (trainer.evaluate.rank_batches) over the whole catalogue. Results come overall and
broken down: returning users (events before the period) vs new users, warm items (events before
the period) vs cold items (first seen in it), a user's first event in the period vs later ones,
and repeats (the item is already in the user's history) vs new items.

A run trained on an older vocabulary is grown to the data's: items it never saw are misses as
targets and UNK in histories, unless it reads item text or attributes, which give them vectors
(``cold_items``): then they are ranked like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data_sharding import shards
from data_sharding.batching import collate_windows
from data_sharding.vocab import UNK_ITEM
from trainer import baselines
from trainer.errors import ConfigError
from trainer.eval_part import WHOLE, Part
from trainer.evaluate import EvalConfig, ModelScorer, eval_mode, rank_batches, rank_metrics
from trainer.online_pairs import PeriodPairs, observing
from trainer.periods import Period, catalogue, iter_period, previous_period

GROUPS = {
    "returning_users": ("returning", True),
    "new_users": ("returning", False),
    "warm_items": ("cold", False),
    "cold_items": ("cold", True),
    "first_event": ("first", True),
    "later_events": ("first", False),
    "repeat_items": ("repeat", True),
    "new_to_user_items": ("repeat", False),
    "tied_events": ("tied", True),
    "untied_events": ("tied", False),
}
"""Breakdown name -> (flag, value): the scored events whose flag has that value."""


def fit_before(root, period: Period, num_items: int, fitters: list) -> np.ndarray:
    """Feed every user's events before the period to ``fitters`` (``add_user(items, ts)``), finish
    them, and return the (V,) events per item before the period (warm items have some)."""
    counts = np.zeros(num_items, dtype=np.int64)
    for _, events, _, before in iter_period(root, period):
        past = events[before]
        if not len(past):
            continue
        counts += np.bincount(past["item"], minlength=num_items)
        for fitter in fitters:
            fitter.add_user(past["item"].astype(np.int64), past["ts"])
    for fitter in fitters:
        fitter.finish()
    return counts


@dataclass
class PeriodQueries:
    """The windows to score, streamed in batches, and what is known about each (in order)."""

    root: object
    period: Period
    max_len: int
    batch_size: int
    warm: np.ndarray

    def __post_init__(self) -> None:
        self.flags: dict[str, list[bool]] = {name: [] for name in ("returning", "cold", "first", "repeat", "tied")}
        self.targets: list[int] = []
        self.summary = {"events": 0, "scored": 0, "without_context": 0, "users": 0, "new_users": 0}

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        users, windows, seen = [], [], []
        for uidx, events, target, before in iter_period(self.root, self.period):
            positions = np.flatnonzero(target)
            if not len(positions):
                continue
            returning = bool(before.any())
            self.summary["users"] += 1
            self.summary["new_users"] += not returning
            self.summary["events"] += len(positions)
            for n, t in enumerate(positions):
                if t == 0:  # the user's first event ever: nothing to predict it from
                    self.summary["without_context"] += 1
                    continue
                item = int(events["item"][t])
                history = events["item"][:t]
                # Tied: at the same time as the user's event before it, so their order is only the file's.
                tied = bool(events["ts"][t] == events["ts"][t - 1])
                self._record(returning, not self.warm[item], n == 0, bool((history == item).any()), tied, item)
                users.append(int(uidx))
                windows.append(events[max(0, t - self.max_len) : t + 1])
                seen.append(history)
                if len(windows) == self.batch_size:
                    yield collate_windows(users, windows, seen=seen)
                    users, windows, seen = [], [], []
        if windows:
            yield collate_windows(users, windows, seen=seen)

    def _record(self, returning: bool, cold: bool, first: bool, repeat: bool, tied: bool, item: int) -> None:
        for name, value in zip(self.flags, (returning, cold, first, repeat, tied), strict=True):
            self.flags[name].append(value)
        self.targets.append(item)
        self.summary["scored"] += 1

    def describe(self) -> dict:
        flags = {k: np.array(v, dtype=bool) for k, v in self.flags.items()}
        scored = max(1, self.summary["scored"])
        return {
            "period": self.period.to_dict(),
            **self.summary,
            "cold_events": int(flags["cold"].sum()),
            "repeat_share": round(float(flags["repeat"].sum() / scored), 6),
            "tied_share": round(float(flags["tied"].sum() / scored), 6),
        }


def breakdown(ranks: np.ndarray, flags: dict[str, list[bool]], ks: list[int]) -> dict[str, dict]:
    """Metrics of each group of scored events (see GROUPS); empty groups are left out."""
    out = {}
    for group, (flag, value) in GROUPS.items():
        select = np.array(flags[flag], dtype=bool) == value
        if select.any():
            out[group] = rank_metrics(ranks[select], ks)
    return out


def score_period(
    scorers: dict,
    root,
    period: Period,
    cfg: EvalConfig,
    max_len: int,
    rankable: dict[str, torch.Tensor] | None = None,
    fitters: list | None = None,
    device: torch.device | None = None,
    warm_only: tuple[str, ...] = (),
    part: Part = WHOLE,
) -> tuple[dict, dict[str, dict]]:
    """(period summary, {name: {"overall": metrics, "breakdown": {group: metrics}}}) of every
    scorer on the same windows. ``fitters``: baselines among the scorers, fit here on the events
    before the period (one pass for all of them). ``warm_only``: scorers that may only rank items
    with an event before the period (a model that cannot encode items it never trained on).
    ``part``: this process's share of the batches, merged (trainer.evaluate.Part)."""
    num_items = next(iter(scorers.values())).num_items
    warm = fit_before(root, period, num_items, fitters or []) > 0
    rankable = dict(rankable or {})
    for name in warm_only:
        warm_items = torch.from_numpy(warm)
        rankable[name] = warm_items if rankable.get(name) is None else rankable[name] & warm_items
    queries = PeriodQueries(root, period, max_len, cfg.batch_size, warm)
    items = int(catalogue(root, period).sum())
    device = device or torch.device("cpu")
    # Online counts: the period's own pairs, for the scorers that count them (never a stored split).
    pairs = PeriodPairs(root, period, num_items) if period.split is None else None
    fitted = fitters or []
    listening = [s for s in scorers.values() if cfg.online_counts or any(s is f for f in fitted)]
    with observing(listening, pairs):
        results = rank_batches(scorers, queries.batches(), cfg, device, rankable, True, items, part=part)
    summary = queries.describe()
    known = getattr(scorers.get("model"), "known", None)
    summary["unknown_targets"] = int((np.array(queries.targets) >= known).sum()) if known is not None else 0
    if summary["events"] == 0:
        raise ConfigError(f"{root}: the period ({period.label()}) has no events")
    out = {}
    for name, metrics in results.items():
        ranks = metrics.pop("ranks")
        out[name] = {"overall": metrics, "breakdown": breakdown(ranks, queries.flags, cfg.ks)}
    return summary, out


def evaluate_model_on_period(
    model, root, period: Period, cfg: EvalConfig, max_len: int, device, part: Part = WHOLE
) -> dict:
    """Next-period metrics of one model (e.g. in training, validated on the newest generation). The
    model's tables cover the data's whole vocabulary, so items without an event before the period
    are ranked only when it encodes them from text or attributes."""
    encodes = model.items.text_proj is not None or model.items.attributes is not None
    with eval_mode(model):
        _, results = score_period(
            {"model": ModelScorer(model)},
            root,
            period,
            cfg,
            max_len,
            rankable={"model": catalogue(root, period)},
            device=device,
            warm_only=() if encodes else ("model",),
            part=part,
        )
    return results["model"]["overall"]


def choose_baseline(kind: str, root, period: Period, cfg: EvalConfig, max_len: int, num_items: int) -> dict:
    """Settings of a ``kind`` baseline chosen on the period before ``period`` (NDCG at the first
    cut-off): {"params", "chosen_on", "candidates"}. Without an earlier period: the defaults."""
    grid = baselines.GRIDS[kind]
    previous = previous_period(root, period) if len(grid) > 1 else None
    if previous is None:
        return {"params": baselines.DEFAULTS[kind], "chosen_on": None, "candidates": []}
    fitted = {str(i): baselines.build(kind, num_items, p) for i, p in enumerate(grid)}
    try:
        _, results = score_period(fitted, root, previous, cfg, max_len, fitters=list(fitted.values()))
    except ConfigError:  # an empty previous period: nothing to choose on
        return {"params": baselines.DEFAULTS[kind], "chosen_on": None, "candidates": []}
    key = f"ndcg@{min(cfg.ks)}"
    scores = [results[str(i)]["overall"][key] for i in range(len(grid))]
    best = int(np.argmax(scores))  # the first of equals
    candidates = [{**p.describe(kind), key: s} for p, s in zip(grid, scores, strict=True)]
    return {"params": grid[best], "chosen_on": previous.label(), "candidates": candidates}


def baseline_scorers(kinds: list[str], root, period: Period, cfg: EvalConfig, max_len: int, num_items: int):
    """({name: unfitted baseline}, {name: how its settings were chosen}) for ``kinds``."""
    scorers, choices = {}, {}
    for kind in kinds:
        choice = choose_baseline(kind, root, period, cfg, max_len, num_items)
        scorers[kind] = baselines.build(kind, num_items, choice["params"])
        choices[kind] = {**choice, "params": choice["params"].describe(kind)}
    return scorers, choices


class KnownItems:
    """A model scorer over a catalogue grown after it trained: items it never saw read as UNK in
    histories (unless the model encodes them from text or attributes)."""

    def __init__(self, scorer: ModelScorer, known: int, encode_cold: bool) -> None:
        self.scorer, self.known, self.encode_cold = scorer, known, encode_cold
        self.num_items = scorer.num_items

    def __call__(self, batch, rows, pos, mask) -> torch.Tensor:
        if not self.encode_cold:
            items = batch["items"]
            batch = {**batch, "items": torch.where(items < self.known, items, torch.full_like(items, UNK_ITEM))}
        return self.scorer(batch, rows, pos, mask)

    @property
    def models(self) -> list:
        return self.scorer.models

    def observe(self, pairs) -> None:
        self.scorer.observe(pairs)

    def side_metrics(self, metrics, batch, rows, pos) -> None:
        self.scorer.side_metrics(metrics, batch, rows, pos)


def evaluate_next_period(
    model: tuple[KnownItems, torch.Tensor, dict] | None,
    root,
    period: Period,
    cfg: EvalConfig,
    baseline_kinds: list[str] | None = None,
    log=print,
) -> dict:
    """A model (``(scorer, rankable, facts)`` from trainer.run.run_scorer: one run or an ensemble,
    named "model") and count baselines on one period, by the same code: {"summary", "exclude_seen",
    "scorers": {name: results}, "baselines": {name: how its settings were chosen}, "model": facts}."""
    scorers, rankable, facts = {}, {}, {}
    if model is not None:
        scorers["model"], rankable["model"], facts = model
    max_len = facts.get("max_len", 50)
    num_items = _num_items(root)
    choices = {}
    if baseline_kinds:
        fitted, choices = baseline_scorers(baseline_kinds, root, period, cfg, max_len, num_items)
        scorers.update(fitted)
    if not scorers:
        raise ConfigError("nothing to evaluate: give runs or baselines")
    period_items = catalogue(root, period)
    rankable = {name: period_items & rankable.get(name, period_items) for name in scorers}
    fitters = [scorers[k] for k in baseline_kinds or []]
    with eval_mode(scorers["model"].models if model is not None else []):
        summary, results = score_period(scorers, root, period, cfg, max_len, rankable, fitters)
    if facts:
        facts["unknown_targets"] = summary.pop("unknown_targets")
        if facts["unknown_targets"] and not facts["encodes_cold_items"]:
            log(f"{facts['unknown_targets']:,} scored events are items the run never saw: counted as misses")
    else:
        summary.pop("unknown_targets")
    return {
        "summary": summary,
        "exclude_seen": cfg.exclude_seen,
        "scorers": results,
        "baselines": choices,
        "model": facts,
    }


def _num_items(root) -> int:
    return int(shards.load_manifest(root)["vocab"]["num_items"])


def flat_metrics(result: dict, k: int = 10) -> dict[str, float]:
    """{scorer_ndcg@k, scorer_hr@k, scorer_mrr, scorer_<group>_ndcg@k, ...} of a period result."""
    out: dict[str, float] = {}
    for name, scores in result["scorers"].items():
        for key in (f"ndcg@{k}", f"hr@{k}", "mrr", f"coverage@{k}"):
            if key in scores["overall"]:
                out[f"{name}_{key}"] = scores["overall"][key]
        for group, metrics in scores["breakdown"].items():
            out[f"{name}_{group}_ndcg@{k}"] = metrics[f"ndcg@{k}"]
            out[f"{name}_{group}_events"] = metrics["count"]
    return out
