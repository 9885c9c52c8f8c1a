"""Online counts: pairs of the predicted period, counted for the queries that come after them."""

import numpy as np
import pytest
import torch
from conftest import shard, shard_generations, tiny_config, write_lines

from trainer.evaluate import EvalConfig
from trainer.next_period import evaluate_next_period
from trainer.online_pairs import OnlinePairs, PeriodPairs
from trainer.periods import resolve_period
from trainer.priors import TransitionPrior
from trainer.run import run_scorer, train_run

HEAD = "user,item,ts"
T0 = 1_600_000_000
# Before the period: a -> b twice. In the period: u3 and u4 go a -> c (c is new), u5 a -> b.
BEFORE = [("u1", "a", 100), ("u1", "b", 200), ("u2", "a", 110), ("u2", "b", 210)]
PERIOD = [("u3", "a", 1000), ("u3", "c", 1010), ("u4", "a", 1020), ("u4", "c", 1030)]
PERIOD += [("u5", "a", 1040), ("u5", "b", 1050)]


def period_log(tmp_path):
    return shard_generations(tmp_path, [BEFORE, PERIOD], T0)


def prior_run(tmp_path, steps: int):
    """The period log and a tiny run with a transition prior trained on its first generation."""
    data = period_log(tmp_path)
    cfg = tiny_config(data, max_steps=steps)
    cfg.model.transition_prior = True
    run = tmp_path / "run"
    train_run(run, cfg, log=lambda *a: None)
    return data, run


def test_online_pairs_count_only_what_happened_before_each_query():
    # Pairs 3 -> 4 known at 10 and at 20, 3 -> 5 at 20 (weight 1/2), 4 -> 5 at 30.
    pairs = OnlinePairs(
        np.array([3, 3, 3, 4]), np.array([4, 4, 5, 5]), np.array([10, 20, 20, 30]), np.array([1, 1, 0.5, 1]), 6
    )
    rows = pairs.rows(torch.tensor([3, 3, 3, 4, 0]), torch.tensor([10, 11, 21, 31, 99]))
    assert rows[0].tolist() == [0] * 6  # at 10: the pair known at 10 is not before it
    assert rows[1].tolist() == [0, 0, 0, 0, 1, 0]
    assert rows[2].tolist() == [0, 0, 0, 0, 2, 0.5]
    assert rows[3].tolist() == [0, 0, 0, 0, 0, 1]
    assert rows[4].tolist() == [0] * 6  # a source without pairs
    # Decayed as a count table decays its pairs: 2 ** ((known_at - reference) / half-life).
    decayed = pairs.rows(torch.tensor([3]), torch.tensor([21]), decay=(20, 10.0))
    assert decayed[0, 4].item() == pytest.approx(2**-1 + 1) and decayed[0, 5].item() == pytest.approx(0.5)


def test_transition_online_counts_the_period_as_it_unfolds(tmp_path):
    data = period_log(tmp_path)
    cfg = EvalConfig(ks=[1, 10], exclude_seen=False)
    result = evaluate_next_period(None, data, resolve_period(data), cfg, ["transition", "transition-online"])
    static, online = result["scorers"]["transition"], result["scorers"]["transition-online"]
    assert result["summary"]["scored"] == 3  # u3's c, u4's c, u5's b (first events have no history)
    # u3's c at 1010: nothing of the period is known yet; P(b | a) = 1, then a (popularity), then c.
    # u4's c at 1030: online, u3's a -> c (1010) is known: P(c | a) = 1/3, c second. Static: third.
    # u5's b at 1050: online P(b | a) = P(c | a) = 1/2, b first by popularity. Static: b first.
    assert static["breakdown"]["cold_items"]["mrr"] == pytest.approx(1 / 3)
    assert online["breakdown"]["cold_items"]["mrr"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert static["overall"]["hr@1"] == online["overall"]["hr@1"] == pytest.approx(1 / 3)
    assert result["baselines"]["transition-online"]["chosen_on"] is None


def test_on_a_stored_split_the_online_transition_is_the_transition(tmp_path):
    # Leave-one-out valid/test events are not a period that unfolds in time: nothing is counted online.
    loo = tmp_path / "loo"
    rows = [f"u{u},i{(u + t) % 5},{T0 + t}" for u in range(9) for t in range(6)]
    shard([write_lines(tmp_path / "loo.csv", [HEAD, *rows])], loo)
    cfg = EvalConfig(ks=[1, 10], exclude_seen=True)
    kinds = ["transition", "transition-online"]
    split = evaluate_next_period(None, loo, resolve_period(loo, split="test"), cfg, kinds)
    assert split["scorers"]["transition"]["overall"] == split["scorers"]["transition-online"]["overall"]


def test_the_transition_prior_adds_online_counts_known_before_the_query():
    # Static table: 3 -> 4 counted 2. Online: 3 -> 5 known at 100.
    crow = np.array([0, 0, 0, 0, 1, 1, 1])
    pairs = {"crow": crow, "col": np.array([4]), "count": np.array([2.0]), "steps": np.array(1)}
    prior = TransitionPrior(pairs, 6)
    prior.online = OnlinePairs(np.array([3]), np.array([5]), np.array([100]), np.array([1.0]), 6)
    src = torch.tensor([[3], [3]])
    features = prior.features(src, at=torch.tensor([100, 101]))[0]
    assert features[0].tolist() == pytest.approx(np.log1p([0, 0, 0, 0, 2, 0]).tolist())
    assert features[1].tolist() == pytest.approx(np.log1p([0, 0, 0, 0, 2, 1]).tolist())
    assert torch.equal(prior.features(src)[0, 0], features[0])  # without times: the static table
    with pytest.raises(ValueError, match="not in training"):
        prior.features(src, leave_out=torch.tensor([4, 4]), at=torch.tensor([1, 1]))


@pytest.mark.parametrize("online", [True, False])
def test_a_model_scores_with_the_periods_pairs_only_while_scoring_it(tmp_path, online):
    data, run = prior_run(tmp_path, 3)
    scorer, rankable, facts = run_scorer([run], data, log=lambda *a: None)
    prior = scorer.models[0].prior
    with torch.no_grad():
        prior.weight.fill_(50.0)  # the counts decide
    eval_cfg = EvalConfig(ks=[1, 10], exclude_seen=False, online_counts=online)
    seen = []
    observe = scorer.observe
    scorer.observe = lambda pairs: (seen.append(pairs), observe(pairs))
    result = evaluate_next_period((scorer, rankable, facts), data, resolve_period(data), eval_cfg, ["transition"])
    assert prior.online is None  # taken back after scoring
    cold = result["scorers"]["model"]["breakdown"]["cold_items"]["mrr"]
    if online:
        assert isinstance(seen[0], PeriodPairs) and seen[-1] is None
        assert cold > result["scorers"]["transition"]["breakdown"]["cold_items"]["mrr"]  # u4's c lifted
    else:
        assert seen == []


def test_the_cli_offers_every_baseline():
    from launch.eval_cli import BASELINE_KINDS
    from trainer.baselines import KINDS

    assert BASELINE_KINDS == KINDS


def test_recent_popularity_online_counts_the_window_before_each_query():
    from trainer.baselines import BaselineParams, Popularity

    day = 86_400_000
    fit = Popularity(6, BaselineParams(window_days=2, online=True))
    fit.add_user(np.array([3, 3, 4]), np.array([0, 1, 2]) * day)
    fit.finish()

    class Period:  # the period's events: item 5 on days 3 and 4, item 4 on day 4
        def events(self):
            return np.array([5, 5, 4]), np.array([3, 4, 4]) * day

    fit.observe(Period())
    times = torch.tensor([[0, 2 * day], [0, 4 * day], [0, 5 * day]])
    batch = {"items": torch.zeros(3, 2, dtype=torch.int64), "times": times}
    scores = fit(batch, torch.arange(3), torch.zeros(3, dtype=torch.int64), torch.ones(3, 2, dtype=torch.bool))
    # Windows [0, 2), [2, 4), [3, 5) days: before each query's time only.
    assert scores[:, 3:].tolist() == [[2, 0, 0], [0, 1, 1], [0, 1, 2]]
    fit.observe(None)
    static = fit(batch, torch.arange(3), torch.zeros(3, dtype=torch.int64), batch["items"] >= 0)
    assert static[:, 3:].tolist() == [[2, 1, 0]] * 3  # the 2 days up to the newest fitted event, inclusive


def test_the_eval_command_counts_online_unless_told_not_to(tmp_path, monkeypatch):
    from launch.cli import main
    from trainer.evaluate import ModelScorer

    data, run = prior_run(tmp_path, 2)
    handed = []
    monkeypatch.setattr(ModelScorer, "observe", lambda self, pairs: handed.append(pairs))
    assert main(["eval", "--run", str(run), "--protocol", "next-period", "--no-online-counts"]) == 0
    assert handed == []
    assert main(["eval", "--run", str(run), "--protocol", "next-period"]) == 0
    assert isinstance(handed[0], PeriodPairs) and handed[-1] is None
