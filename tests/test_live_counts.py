"""Live counts: a served model's transition prior counts the pairs of the events posted to it, its
trend prior the events themselves; a restart and a hot reload count the stored ones again."""

import time

import numpy as np
import pytest
import torch
from conftest import shard_generations, tiny_config
from test_online_counts import T0, prior_run

from serving.service import Recommender, ServiceConfig
from serving.store import Event
from trainer.export import export_run
from trainer.online_pairs import LivePairs, OnlinePairs
from trainer.run import train_run


def test_live_pairs_count_each_new_event_after_the_ones_before_it():
    live = LivePairs(num_items=7, steps=2, since=15)
    # A user's events 3, 4, 5 at 10, 20, 30; 4 and 5 are new: 3 -> 4 (1), 4 -> 5 (1), 3 -> 5 (1/2).
    assert live.add([3, 4, 5], [10, 20, 30], [False, True, True]) == 3
    # Not newer than the count table (15): already counted there. Reserved ids, ids beyond it: never.
    assert live.add([3, 4], [10, 15], [False, True]) == 0
    assert live.add([1, 4, 9], [20, 21, 22], [True] * 3) == 0
    rows = live.rows(torch.tensor([3, 3, 4, 6]), torch.tensor([31, 25, 30, 99]))
    assert rows[0].tolist() == [0, 0, 0, 0, 1, 0.5, 0]
    assert rows[1].tolist() == [0, 0, 0, 0, 1, 0, 0]  # at 25 the pair known at 30 has not happened
    assert rows[2].tolist() == [0] * 7  # known at 30: not before 30
    assert rows[3].tolist() == [0] * 7
    # The same pairs as next-period scoring holds them: the same rows.
    held = OnlinePairs(np.array([3, 4, 3]), np.array([4, 5, 5]), np.array([20, 30, 30]), np.array([1, 1, 0.5]), 7)
    at = torch.tensor([31, 25, 30, 99])
    assert torch.equal(held.rows(torch.tensor([3, 3, 4, 6]), at), rows)


def test_a_served_model_adds_live_counts_to_its_prior_and_recounts_them_after_a_restart(tmp_path):
    data, run = prior_run(tmp_path, 3)
    state = tmp_path / "state.sqlite"
    service = Recommender(ServiceConfig(run, state, reload_seconds=0))
    model = service.current.model
    live, prior = model.live, model.prior
    with torch.no_grad():
        prior.weight.fill_(2.0)  # a visible weight (3 training steps leave it near zero)
    assert live is not None and live.since >= (T0 + 210) * 1000  # the run counted its training events
    a, b = model.item_index["a"], model.item_index["b"]
    # Events as old as the count table's are in it already: not counted again.
    service.add_events("old", [Event("a", None, live.since - 2000), Event("b", None, live.since - 1000)])
    assert live.pairs == 0
    # New events, posted one at a time: the second pairs with the stored first.
    now = int(time.time() * 1000)
    service.add_events("z", [Event("a", None, now - 20_000)])
    service.add_events("z", [Event("b", None, now - 10_000)])
    assert live.pairs == 1
    hidden = model.start([a], [1], [now - 30_000]).hidden[None]
    context, gap = model.context([[a]]), torch.tensor([30_000])
    frozen = model.scores(hidden, context, gap)
    counted = model.scores(hidden, context, gap, at_ms=torch.tensor([now]))
    count = float(prior.counts(torch.tensor([a]), torch.tensor([b]))[0, 0])
    assert model.query_gaps is None  # the state that weighs the counts is the history's
    with torch.no_grad():
        weight = float(prior.row_weights(hidden)[0, 0])
    expected = weight * (np.log1p(count + 1) - np.log1p(count))
    assert expected > 0.1
    assert float(counted[0, b] - frozen[0, b]) == pytest.approx(expected, rel=1e-4, abs=1e-6)
    others = torch.ones(model.num_items, dtype=torch.bool)
    others[b] = False
    torch.testing.assert_close(counted[0, others], frozen[0, others])
    # Before the pair happened, the query reads none of it.
    torch.testing.assert_close(model.scores(hidden, context, gap, at_ms=torch.tensor([now - 10_000])), frozen)
    assert service.recommend("z", None, 3)["items"]
    service.stop()
    # A restart counts the stored events newer than the counts again: the same live rows.
    again = Recommender(ServiceConfig(run, state, reload_seconds=0))
    assert again.current.model.live.pairs == 1
    src, at = torch.tensor([a, b]), torch.tensor([now, now])
    assert torch.equal(again.current.model.live.rows(src, at), live.rows(src, at))
    again.stop()
    # So does a hot reload (a new export of the run): the reloaded model's live rows are the same.
    export = tmp_path / "export"
    export_run(run, export)
    served = Recommender(ServiceConfig(export, state, reload_seconds=0))
    first = served.current.model
    export_run(run, export, overwrite=True)
    assert served.reload_if_changed() and served.current.model is not first
    assert served.current.model.live.pairs == 1
    assert torch.equal(served.current.model.live.rows(src, at), live.rows(src, at))
    served.stop()


def test_a_served_trend_prior_counts_posted_events_at_each_request_time(tmp_path):
    rows = [(f"u{u}", x, 60 * u + k) for u in range(4) for k, x in enumerate("abc")]
    data = shard_generations(tmp_path, [rows], 1_600_000_000)
    cfg = tiny_config(data, max_steps=3)
    cfg.model.trend_prior = True
    run = tmp_path / "run"
    train_run(run, cfg, log=lambda *a: None)
    state = tmp_path / "state.sqlite"
    service = Recommender(ServiceConfig(run, state, reload_seconds=0))
    model = service.current.model
    live, trend = model.live_events, model.trend
    assert live.since == (1_600_000_000 + 182) * 1000  # the newest training event
    with torch.no_grad():
        trend.weight.zero_()
        trend.weight[0] = 1.0  # the 1-day count alone
    now = int(time.time() * 1000)
    service.add_events("x", [Event("b", None, now - 2000)])
    service.add_events("y", [Event("b", None, now - 1000), Event("c", None, live.since)])  # c: not newer
    assert live.events == 2
    b = model.item_index["b"]
    hidden = model.start([b], [1], [now - 5000]).hidden[None]
    context, gap = model.context([[b]]), torch.tensor([5000])
    before = model.scores(hidden, context, gap, torch.tensor([now - 3000]))
    after = model.scores(hidden, context, gap, torch.tensor([now]))
    assert float(after[0, b] - before[0, b]) == pytest.approx(np.log1p(2), rel=1e-5)
    others = torch.ones(model.num_items, dtype=torch.bool)
    others[b] = False
    torch.testing.assert_close(after[0, others], before[0, others])
    assert service.recommend("x", None, 2)["items"]
    service.stop()
    # A restart counts the stored events newer than the run's again; so does a hot reload.
    export = tmp_path / "export"
    export_run(run, export)
    again = Recommender(ServiceConfig(export, state, reload_seconds=0))
    first = again.current.model
    assert first.live_events.events == 2
    export_run(run, export, overwrite=True)
    assert again.reload_if_changed()
    assert again.current.model is not first and again.current.model.live_events.events == 2
    again.stop()
