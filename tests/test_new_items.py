"""Items posted after training (POST /v1/items): vectors from their text and attributes, built as
the trained item encoder builds them, recommendable at once, kept across restarts and exports."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from conftest import shard
from test_serving import Server
from test_text_tower import log_with_titles, tower_config

from data_sharding.vocab import NUM_RESERVED_ITEMS, UNK_ITEM
from serving.service import Recommender, RequestError, ServiceConfig
from serving.store import Event
from trainer.export import export_run, load_inference
from trainer.run import load_run_model, train_run
from trainer.trend_prior import AGE_BUCKETS


def _tower_run(root, tower_dir, steps: int, **model):
    """``root``/run: the titled log's run through the (tiny) LLM tower, with these model settings."""
    events, items = log_with_titles(root, range(30), 1_600_000_000)
    shard([events], root / "data", items=str(items))
    cfg = tower_config(root / "data", tower_dir, max_steps=steps)
    for name, value in model.items():
        setattr(cfg.model, name, value)
    train_run(root / "run", cfg, log=lambda *a: None)
    return root


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tower_dir):
    """A run that reads item text through the (tiny) LLM tower and attributes, with id dropout."""
    root = _tower_run(tmp_path_factory.mktemp("newitems"), tower_dir, 12, id_dropout=0.2)
    export_run(root / "run", root / "export")
    return root


def test_a_new_items_vector_is_built_like_a_trained_items_from_the_same_text(text_run):
    model = load_inference(text_run / "run", log=lambda *a: None)
    trained, _, info = load_run_model(text_run / "run", log=lambda *a: None)
    i3 = model.item_index["i3"]
    title, attributes = info.titles[i3], info.attributes[i3]
    assert model.add_items(["twin", "i3"], [title, None], [attributes, None]) == ["twin"]
    twin = model.item_index["twin"]
    ids = trained.items.ids.weight.detach()
    # Same text and attributes as i3: the vectors differ only in the id part (the UNK row here).
    torch.testing.assert_close(
        model.item_table[twin] - model.item_table[i3], ids[UNK_ITEM] - ids[i3], atol=1e-5, rtol=1e-5
    )
    assert model.num_items == len(info.items) + 1 and model.items[twin] == "twin"


def test_a_new_item_posted_to_the_server_is_recommendable_at_once(text_run):
    server = Server(text_run / "export", text_run / "state.sqlite", "--reload-seconds", "0", flag="--model")
    try:
        history = {"history": [{"item": "i2"}, {"item": "i3"}], "k": 50}  # k: more than the catalogue
        status, before = server.post("/v1/recommend", history)
        assert status == 200 and "new1" not in [r["item"] for r in before["items"]]
        body = {"items": [{"item": "new1", "title": "blue ball", "attributes": {"kind": ["sport"]}}, {"item": "i1"}]}
        status, out = server.post("/v1/items", body)
        assert status == 200 and out["added"] == ["new1"] and out["known"] == ["i1"]
        status, after = server.post("/v1/recommend", history)
        ranked = {r["item"]: r["score"] for r in after["items"]}
        assert status == 200 and len(ranked) == len(before["items"]) + 1 and ranked["new1"] > float("-inf")
        assert {k: v for k, v in ranked.items() if k != "new1"} == {r["item"]: r["score"] for r in before["items"]}
        # Events on the new item are accepted now.
        status, _ = server.post("/v1/events", {"user": "u", "events": [{"item": "new1", "timestamp": 1_700_000_000}]})
        assert status == 200
        status, err = server.post("/v1/items", {"items": [{"item": "x"}, {"item": "x"}]})
        assert status == 422 and "twice" in err["detail"]
    finally:
        server.stop()
    # A restarted server places the posted item again, with the same vector.
    first = Recommender(ServiceConfig(text_run / "export", text_run / "state.sqlite", reload_seconds=0))
    again = Recommender(ServiceConfig(text_run / "export", text_run / "state.sqlite", reload_seconds=0))
    for service in (first, again):
        assert "new1" in service.current.model.item_index
    a, b = (s.current.model for s in (first, again))
    torch.testing.assert_close(a.item_table[a.item_index["new1"]], b.item_table[b.item_index["new1"]])
    first.stop()
    again.stop()


def test_a_model_that_reads_no_text_or_attributes_refuses_new_items(tmp_path, cyclic_data):
    from test_inference import run_config

    train_run(tmp_path / "run", run_config(cyclic_data, item_text="none"), log=lambda *a: None)
    service = Recommender(ServiceConfig(tmp_path / "run", tmp_path / "s.sqlite", reload_seconds=0))
    with pytest.raises(RequestError, match="cannot place new items"):
        service.add_items(["new"], ["a title"], [None])
    service.stop()


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory, tower_dir):
    """A run that reads item text (so it can place new items) with the count priors and the repeat prior."""
    root = tmp_path_factory.mktemp("newcounts")
    return _tower_run(root, tower_dir, 3, transition_prior=True, trend_prior=True, repeat_prior=True)


def _scorer(model, now: int):
    """Scores of every item at ``now``, after a history of one item a minute earlier."""

    def scores(source: int) -> torch.Tensor:
        hidden = model.start([source], [1], [now - 60_000]).hidden[None]
        return model.scores(hidden, model.context([[source]]), torch.tensor([60_000]), torch.tensor([now]))[0]

    return scores


def _step_weight(model, source: int, now: int) -> float:
    """The transition prior's first-step weight for the query after ``source`` (no query-time part)."""
    assert model.query_gaps is None
    with torch.no_grad():
        return float(model.prior.row_weights(model.start([source], [1], [now - 60_000]).hidden[None])[0, 0])


def _placed_meanwhile_keeps_scores(model, scores, source: int, expected: torch.Tensor) -> None:
    """Items placed while a request scores leave its scores as they were."""
    # The request read the item table just before the counts grew: they are cut to its catalogue.
    model.live.grow(model.num_items + 1)
    model.trend.grow(model.num_items + 1)
    assert torch.equal(scores(source), expected)
    # An item placed between two steps' reads of the live pairs: every step is read at one width.
    rows = model.live.rows

    def rows_then_grow(*args, **kwargs):
        out = rows(*args, **kwargs)
        model.live.grow(model.live.num_items + 1)
        return out

    model.live.rows = rows_then_grow
    assert model.prior.steps > 1 and torch.equal(scores(source), expected)


def _repeats_count_posted_items(scores, model, new: int) -> None:
    """The repeat prior counts a posted item in a history as it counts a trained one."""
    trained = model.repeat.weight.detach().clone()
    with torch.no_grad():
        model.repeat.weight.fill_(0.0)
        plain = scores(new)
        model.repeat.weight.fill_(0.5)
        moved = scores(new) - plain
        model.repeat.weight.copy_(trained)
    assert float(moved[new]) == pytest.approx(0.5 * np.log1p(1), rel=1e-5)  # the history holds it once
    moved[new] = 0
    assert float(moved[NUM_RESERVED_ITEMS:].abs().max()) == 0  # and nothing else (reserved ids: -inf)


def test_items_posted_after_training_are_counted_live_by_both_priors(counted_run):
    state = counted_run / "state.sqlite"
    service = Recommender(ServiceConfig(counted_run / "run", state, reload_seconds=0))
    model = service.current.model
    with torch.no_grad():
        model.prior.weight.fill_(2.0)  # visible weights (3 training steps leave them near zero)
        model.trend.weight.zero_()
        model.trend.weight[0] = 1.0  # the trend prior's 1-day count
        k = len(model.trend.windows_ms)
        model.trend.weight[k:] = 0.1 * torch.arange(AGE_BUCKETS)  # and a bias that grows with age
    assert service.add_items(["new1"], ["blue ball"], [None])["added"] == ["new1"]
    new, i2, i3 = (model.item_index[i] for i in ("new1", "i2", "i3"))
    now = int(time.time() * 1000)
    scores = _scorer(model, now)
    before = {src: scores(src) for src in (i2, new)}
    # Two users go from i2 to the new item, one of them on to i3.
    service.add_events("x", [Event("i2", "view", now - 50_000), Event("new1", "view", now - 40_000)])
    service.add_events(
        "y", [Event("i2", "view", now - 30_000), Event("new1", "view", now - 20_000), Event("i3", "view", now - 10_000)]
    )
    after = {src: scores(src) for src in (i2, new)}
    # After i2: two live pairs to the new item (it has none in the run's table), its two events of
    # the last day, and its age: first seen under a day ago (bucket 1) where it was unseen (bucket 0).
    expected = _step_weight(model, i2, now) * np.log1p(2) + np.log1p(2) + 0.1
    assert float(after[i2][new] - before[i2][new]) == pytest.approx(expected, rel=1e-4)
    # After the new item as the last event: its live pair to i3 (it has no row in the run's table),
    # and i3's one event of the last day.
    expected = _step_weight(model, new, now) * np.log1p(1) + np.log1p(1)
    assert float(after[new][i3] - before[new][i3]) == pytest.approx(expected, rel=1e-4)
    _repeats_count_posted_items(scores, model, new)
    assert service.recommend("x", None, 3)["items"]
    pairs, events = model.live.pairs, model.live_events.events
    service.stop()
    # A restart places the item again before it recounts the stored events: the same counts.
    again = Recommender(ServiceConfig(counted_run / "run", state, reload_seconds=0))
    moved = again.current.model
    assert moved.item_index["new1"] == new and (moved.live.pairs, moved.live_events.events) == (pairs, events)
    src, at = torch.tensor([i2, new]), torch.tensor([now, now])
    assert torch.equal(moved.live.rows(src, at), model.live.rows(src, at))
    again.stop()
    _placed_meanwhile_keeps_scores(model, scores, i2, after[i2])
