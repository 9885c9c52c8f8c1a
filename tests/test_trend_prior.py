"""The trend prior: recent events and age of each item at the prediction time, never later ones."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import shard_generations, tiny_config

from data_sharding.vocab import NUM_RESERVED_ITEMS
from trainer.errors import ConfigError
from trainer.evaluate import EvalConfig
from trainer.export import load_export, load_run
from trainer.heads import ChunkedSoftmaxCE
from trainer.next_period import evaluate_next_period
from trainer.periods import resolve_period
from trainer.predict import histories_from_data, predict
from trainer.run import run_scorer, train_run
from trainer.trend_prior import AGE_BUCKETS, DAY_MS, EventTimes, LiveEvents, TrendPrior, age_buckets

DAY = DAY_MS
T0_MS = 1_600_000_000 * 1000
# Item 3: days 0, 5, 9, 9. Item 4: day 8. Item 5: never.
EVENTS = {"item": np.array([3, 3, 3, 3, 4]), "ts": np.array([0, 5, 9, 9, 8]) * DAY}


def test_counts_take_only_events_before_the_time_within_the_window():
    table = EventTimes(EVENTS["item"], EVENTS["ts"], 6)
    dst = torch.tensor([[3, 4, 5], [3, 4, 5], [3, 4, 5]])
    at = torch.tensor([9, 10, 100]) * DAY
    week = table.counts(dst, at - 7 * DAY, at)
    assert week.tolist() == [[1, 1, 0], [3, 1, 0], [0, 0, 0]]  # day 9 itself counts only after day 9
    ever = table.counts(dst, at - 1000 * DAY, at)
    assert ever.tolist() == [[2, 1, 0], [4, 1, 0], [4, 1, 0]]
    # Ages at day 10: item 3 first seen day 0 (10 days: bucket 1 + floor(log2(11)) = 4), item 4
    # day 8 (2 days: bucket 2), item 5 never (bucket 0); at day 8, item 4 is not seen yet.
    assert age_buckets(table.first[dst[:1]], torch.tensor([10 * DAY])).tolist() == [[4, 2, 0]]
    assert age_buckets(table.first[dst[:1]], torch.tensor([8 * DAY])).tolist() == [[4, 0, 0]]
    old = age_buckets(torch.tensor([[0]]), torch.tensor([10**6 * DAY]))
    assert old.item() == AGE_BUCKETS - 1  # the last bucket is open


def test_offsets_and_their_exact_full_softmax_gradients():
    prior = TrendPrior(EVENTS, 6, [1.0, 7.0]).double()
    torch.manual_seed(0)
    with torch.no_grad():
        prior.weight.normal_()
    at = torch.tensor([9, 10, 6, 10]) * DAY
    targets = torch.tensor([3, 4, 3, 5])
    offsets = prior.offsets(at, weights=prior.row_weights(at))
    w = prior.weight.detach()
    # Row 1 (day 10), item 3: 1-day window [9, 10): 2 events; 7-day [3, 10): 3; age bucket 4.
    assert offsets[1, 3].item() == pytest.approx(w[0] * np.log1p(2) + w[1] * np.log1p(3) + w[2 + 4])
    assert torch.allclose(
        prior.offsets(at, targets[:, None], weights=prior.row_weights(at))[:, 0],
        offsets[:, 3:].gather(1, targets[:, None] - 3)[:, 0],
    )

    h = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    table = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    loss = ChunkedSoftmaxCE.apply(h, table, targets, 3, [(prior, at)], None, prior.row_weights(h))
    grads = torch.autograd.grad(loss, (h, table, prior.weight))
    copies = [t.detach().clone().requires_grad_() for t in (h, table, prior.weight)]
    reference = TrendPrior(EVENTS, 6, [1.0, 7.0]).double()
    scores = copies[0] @ copies[1].T + reference.offsets(at, weights=copies[2].expand(4, -1))
    scores = torch.cat([torch.full_like(scores[:, :NUM_RESERVED_ITEMS], float("-inf")), scores[:, 3:]], 1)
    expected = F.cross_entropy(scores, targets, reduction="sum")
    assert torch.allclose(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, copies), strict=True):
        assert torch.allclose(got, want, atol=1e-10)


def test_a_period_is_counted_while_it_is_scored_and_forgotten_after(tmp_path):
    from launch.cli import main

    # Before: u1..u3 walk a -> b. In the period (a day later), everyone goes to the new item c.
    before = [(f"u{u}", x, 60 * u + k) for u in range(3) for k, x in enumerate("ab")]
    period = [(f"u{u}", "c", 90_000 + 60 * u) for u in range(3)]
    data = shard_generations(tmp_path, [before, period], 1_600_000_000)
    cfg = tiny_config(data, max_steps=3)
    cfg.model.trend_prior = True
    cfg.data.validate_on_newest = True
    run = tmp_path / "run"
    train_run(run, cfg, log=lambda *a: None)
    assert (run / "item_events.npz").exists()
    scorer, rankable, facts = run_scorer([run], data, log=lambda *a: None)
    trend = scorer.models[0].trend
    assert len(trend.table.keys) == 6  # the run's own events: generation 1
    with torch.no_grad():
        trend.weight.zero_()
        trend.weight[0] = 50.0  # the 1-day count decides
    eval_cfg = EvalConfig(ks=[1], exclude_seen=True)
    result = evaluate_next_period((scorer, rankable, facts), data, resolve_period(data), eval_cfg)
    assert len(trend.table.keys) == 6  # forgotten after scoring
    # u0's c comes first: nothing of the period before it (a miss, a and b excluded: c or
    # another item); u1's and u2's c follow earlier c events of the period: first.
    assert result["scorers"]["model"]["overall"]["count"] == 3
    assert result["scorers"]["model"]["overall"]["hr@1"] >= 2 / 3
    # An export keeps the run's events and weights: the same scores at the same times.
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    served, exported = load_run(run), load_export(tmp_path / "export")
    assert np.array_equal(exported.trend.base[1], served.trend.base[1])
    hidden = served.start([NUM_RESERVED_ITEMS], [1], [T0_MS]).hidden[None]
    context, at = served.context([[NUM_RESERVED_ITEMS]]), torch.tensor([T0_MS + 90 * 60_000])
    expected = served.scores(hidden, context, torch.tensor([60_000]), at)
    torch.testing.assert_close(exported.scores(hidden, context, torch.tensor([60_000]), at), expected)
    with pytest.raises(ConfigError, match="scores at a time"):
        served.scores(hidden, context, torch.tensor([60_000]))
    # Batch prediction scores at its --at time: the same scores as the model at that time.
    histories = list(histories_from_data(data, served, ["u0"]))
    at_ms = T0_MS + 90 * 60_000
    record = predict(served, histories, 3, at_ms=at_ms)[0]
    h = histories[0]
    hidden = served.encode(
        *(torch.from_numpy(a)[None] for a in (h.items, h.types, h.times)), torch.ones(1, len(h.items), dtype=torch.bool)
    )
    gap = torch.tensor([at_ms - int(h.times[-1])])
    expected = served.scores(hidden, served.context([h.items.tolist()]), gap, torch.tensor([at_ms]))
    assert record["scores"][0] == pytest.approx(float(expected.max()), rel=1e-5)


def test_whole_rows_count_as_the_per_item_lookups():
    table = EventTimes(EVENTS["item"], EVENTS["ts"], 6)
    start, end = torch.tensor([0, 3, 9, 50]) * DAY, torch.tensor([9, 10, 10, 60]) * DAY
    every = torch.arange(6).expand(4, -1)
    assert torch.equal(table.rows(start, end), table.counts(every, start, end))


def test_age_buckets_at_their_edges_before_1970_and_for_items_never_seen():
    """Bucket 1 + floor(log2(1 + age in days)), at most AGE_BUCKETS - 1; 0 for no event before T."""
    ages = [0, 1, DAY - 1, DAY, 3 * DAY - 1, 3 * DAY, 7 * DAY, (2**14 - 1) * DAY - 1, (2**14 - 1) * DAY, 10**15]
    expected = [0, 1, 1, 2, 2, 3, 4, 14, 15, 15]
    for at in (T0_MS, -T0_MS):  # times before 1970 are int64 ms too
        first = torch.tensor([[at - a for a in ages] + [np.iinfo(np.int64).max]])
        assert age_buckets(first, torch.tensor([at])).tolist() == [expected + [0]]


def test_overlapping_windows_slide_and_count_as_one_bincount_per_window(monkeypatch):
    """Overlapping windows that move forward together take the sliding path (small blocks here, so
    several blocks are joined); short, scattered or out-of-order ones one bincount each; every row
    equals a bincount of its own window's events."""
    rng = np.random.default_rng(0)
    items, ts = rng.integers(0, 7, 3000), rng.integers(0, 100, 3000) * DAY
    table = EventTimes(items, ts, 9)
    at = torch.unique(torch.from_numpy(rng.integers(0, 120, 60)) * DAY)
    monkeypatch.setattr("trainer.trend_prior.ROWS_BUDGET", 9 * 4)  # blocks of 4 rows
    slid = []
    sliding = EventTimes._sliding
    monkeypatch.setattr(EventTimes, "_sliding", lambda self, lo, hi: slid.append(len(lo)) or sliding(self, lo, hi))
    uneven = at - torch.from_numpy(rng.integers(1, 40, len(at))) * DAY  # starts out of order
    scattered = at[::8]  # 1-hour windows days apart
    cases = [
        (at - 30 * DAY, at, True),
        (at, at - 30 * DAY, False),
        (uneven, at, False),
        (scattered - DAY // 24, scattered, False),
    ]
    for start, end, slides in cases:
        slid.clear()
        expected = torch.stack(
            [
                torch.bincount(torch.from_numpy(items[(ts >= a) & (ts < b)]), minlength=9)
                for a, b in zip(start.tolist(), end.tolist(), strict=True)
            ]
        )
        assert torch.equal(table.rows(start, end), expected)
        assert (sum(slid) > len(start) // 2) if slides else not slid


def test_live_events_count_as_one_table_of_all_the_events():
    base = EventTimes(EVENTS["item"], EVENTS["ts"], 6)
    grown = LiveEvents(base, since=9 * DAY)
    grown.grow(8)  # items added, no event posted yet: the run's events over the wider catalogue
    at = torch.tensor([9, 100]) * DAY
    wide = EventTimes(EVENTS["item"], EVENTS["ts"], 8)
    assert torch.equal(grown.rows(at - 7 * DAY, at), wide.rows(at - 7 * DAY, at))
    assert torch.equal(grown.first, wide.first)
    live = LiveEvents(base, since=9 * DAY)
    # Not newer than the run's newest event, reserved ids, items beyond the catalogue: not counted.
    assert live.add([3, 4, 1, 7, 5, 4], [9 * DAY, 10 * DAY, 11 * DAY, 11 * DAY, 12 * DAY, 12 * DAY]) == 3
    assert live.events == 3
    whole = EventTimes(np.array([3, 3, 3, 3, 4, 4, 5, 4]), np.array([0, 5, 9, 9, 8, 10, 12, 12]) * DAY, 6)
    at = torch.tensor([9, 11, 13, 100]) * DAY
    for days in (1, 7, 1000):
        assert torch.equal(live.rows(at - days * DAY, at), whole.rows(at - days * DAY, at))
        dst = torch.tensor([[3, 4, 5]] * 4)
        assert torch.equal(live.counts(dst, at - days * DAY, at), whole.counts(dst, at - days * DAY, at))
    assert torch.equal(live.first, whole.first)
    # Items added after training (ids 6, 7): counted from their first posted event on, as in one
    # table of every event over the grown catalogue.
    live.grow(8)
    assert live.add([7, 6, 7], [13 * DAY, 14 * DAY, 15 * DAY]) == 3
    items, ts = np.array([3, 3, 3, 3, 4, 4, 5, 4, 7, 6, 7]), np.array([0, 5, 9, 9, 8, 10, 12, 12, 13, 14, 15]) * DAY
    whole = EventTimes(items, ts, 8)
    at = torch.tensor([9, 14, 16, 100]) * DAY
    for days in (1, 7, 1000):
        assert torch.equal(live.rows(at - days * DAY, at), whole.rows(at - days * DAY, at))
        dst = torch.tensor([[3, 5, 6, 7]] * 4)
        assert torch.equal(live.counts(dst, at - days * DAY, at), whole.counts(dst, at - days * DAY, at))
    assert torch.equal(live.first, whole.first)


def test_a_trend_prior_not_yet_served_takes_items_added_after_training():
    """InferenceModel.add_items on a model loaded outside a server: the run's counts over the wider
    catalogue (the items added have none yet), not an error after the item table already grew."""
    trend = TrendPrior(EVENTS, 6, [7])
    with torch.no_grad():
        trend.weight[0] = 1.0
        trend.weight[1:] = torch.arange(AGE_BUCKETS, dtype=torch.float32)
    at = torch.tensor([10 * DAY])
    before = trend.offsets(at)
    trend.grow(8)
    after = trend.offsets(at)
    assert after.shape == (1, 8) and torch.equal(after[:, :6], before)
    assert after[0, 6:].tolist() == [0.0, 0.0]  # no event, never seen (age bucket 0)
