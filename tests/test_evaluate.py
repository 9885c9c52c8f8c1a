"""Ranking metrics against hand-computed cases; the popularity baseline under the same protocol."""

import math

import pytest
import torch
from conftest import shard, write_lines

from trainer.evaluate import EvalConfig, RankingMetrics, target_ranks
from trainer.next_period import evaluate_next_period
from trainer.periods import Period


def evaluate_popularity(data, split: str, cfg: EvalConfig) -> dict:
    """The popularity baseline on a stored split, through the shared scoring code."""
    return evaluate_next_period(None, data, Period(split=split), cfg, ["popularity"])["scorers"]["popularity"][
        "overall"
    ]


def test_ranks_count_higher_scores_and_break_ties_by_item_id():
    scores = torch.tensor([[0.0, 0.0, 0.0, 5.0, 1.0, 5.0, 3.0], [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]])
    # row 0: target 6 (3.0) is beaten by 3 and 5 (5.0) -> rank 2; row 1: all tie, target 5 -> ids 3, 4 first.
    assert target_ranks(scores, torch.tensor([6, 5])).tolist() == [2, 2]


def test_hit_rate_ndcg_mrr_and_coverage_by_hand():
    metrics = RankingMetrics([1, 2], num_items=3 + 4)
    # Three users, targets ranked 0, 1 and 3 (0-based).
    scores = torch.tensor(
        [
            [-9.0, -9, -9, 4, 3, 2, 1],  # target 3 -> rank 0
            [-9.0, -9, -9, 4, 3, 2, 1],  # target 4 -> rank 1
            [-9.0, -9, -9, 1, 2, 3, 4],  # target 3 -> rank 3
        ]
    )
    metrics.add(scores, torch.tensor([3, 4, 3]))
    got = metrics.result()
    assert got["count"] == 3
    assert got["hr@1"] == pytest.approx(1 / 3, abs=1e-6)
    assert got["hr@2"] == pytest.approx(2 / 3, abs=1e-6)
    assert got["ndcg@2"] == pytest.approx((1 + 1 / math.log2(3)) / 3, abs=1e-6)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 3, abs=1e-6)
    # top-1 sets: {3} and {6}; top-2: {3, 4, 5, 6} of 4 real items.
    assert got["coverage@1"] == pytest.approx(2 / 4)
    assert got["coverage@2"] == pytest.approx(4 / 4)


def test_popularity_baseline_scores_the_training_split(tmp_path):
    header = "user,item,ts"
    # Training popularity: a (3 users) > b (2) > c; every user's test item is a or c.
    rows = []
    for u, seq in enumerate([["a", "b", "x", "a"], ["a", "b", "y", "c"], ["a", "c", "z", "a"]]):
        rows += [f"u{u},{item},{1_600_000_000 + 10 * t}" for t, item in enumerate(seq)]
    shard([write_lines(tmp_path / "e.csv", [header, *rows])], tmp_path / "d")
    got = evaluate_popularity(tmp_path / "d", "test", EvalConfig(ks=[1, 3], exclude_seen=False))
    # Test targets: a (rank 0), c (rank 2: after a and b), a (rank 0).
    assert got["hr@1"] == pytest.approx(2 / 3, abs=1e-6)
    assert got["hr@3"] == pytest.approx(1.0)
    assert got["mrr"] == pytest.approx((1 + 1 / 3 + 1) / 3, abs=1e-6)


def test_exclude_seen_removes_history_items_from_the_ranking(tmp_path):
    header = "user,item,ts"
    # u0 already has "a" (the most popular) in its history: excluding seen items promotes "b".
    rows = [f"u0,{item},{1_600_000_000 + t}" for t, item in enumerate(["a", "x", "y", "b"])]
    rows += [f"u{u},a,{1_600_000_000 + u}" for u in range(1, 4)]
    rows += [f"u1,b,{1_600_000_100}", f"u2,b,{1_600_000_100}"]
    shard([write_lines(tmp_path / "e.csv", [header, *rows])], tmp_path / "d")
    plain = evaluate_popularity(tmp_path / "d", "test", EvalConfig(ks=[1], exclude_seen=False))
    unseen = evaluate_popularity(tmp_path / "d", "test", EvalConfig(ks=[1], exclude_seen=True))
    assert plain["count"] == unseen["count"] == 1  # only u0 has >= 3 events
    assert plain["hr@1"] == 0.0 and unseen["hr@1"] == 1.0


def test_two_processes_share_the_batches_and_merge_into_one_process_metrics_exactly(dataset):
    from trainer.eval_part import Part
    from trainer.evaluate import evaluate_model
    from trainer.factory import build_model
    from trainer.heads import HeadsConfig
    from trainer.model import LoraConfig, ModelConfig

    torch.manual_seed(0)
    model_cfg = ModelConfig(backbone="scratch", hidden_size=16, num_heads=2, num_layers=1, max_len=12)
    model, _ = build_model(model_cfg, LoraConfig(), HeadsConfig(value_weight=0.1), dataset)
    cfg = EvalConfig(ks=[1, 10], batch_size=64, exclude_seen=True)
    whole = evaluate_model(model, dataset, "valid", cfg, 12, torch.device("cpu"))
    assert whole["count"] > 3 * cfg.batch_size and "type_accuracy" in whole and "value_rmse" in whole

    # What accelerate.utils.gather_object returns: every rank's partial metrics, in rank order.
    partial: dict[int, dict] = {}

    def gather_as(rank: int):
        def gather(objects: list) -> list:
            partial[rank] = objects[0]
            return [partial.get(r, {"model": RankingMetrics(cfg.ks, model.num_items)}) for r in range(2)]

        return gather

    alone = evaluate_model(model, dataset, "valid", cfg, 12, torch.device("cpu"), Part(1, 2, gather_as(1)))
    assert 0 < alone["count"] < whole["count"]  # rank 1 scored only its share (rank 0's not yet there)
    merged = evaluate_model(model, dataset, "valid", cfg, 12, torch.device("cpu"), Part(0, 2, gather_as(0)))
    assert merged == whole

    # ZeRO-3 (every forward a collective): with an odd number of batches, the rank without a batch
    # in the last round runs one forward more, uncounted; both ranks run as many, metrics unchanged.
    cfg = EvalConfig(ks=[1, 10], batch_size=-(-whole["count"] // 5), exclude_seen=True)  # 5 batches
    forwards = []
    model.backbone.register_forward_hook(lambda *a: forwards.append(1))
    partial.clear()  # rank 1 goes first again: rank 0's share not there yet
    for rank in (1, 0):
        forwards.clear()
        part = Part(rank, 2, gather_as(rank), collective=True)
        got = evaluate_model(model, dataset, "valid", cfg, 12, torch.device("cpu"), part)
        assert len(forwards) == 3
    assert got == evaluate_model(model, dataset, "valid", cfg, 12, torch.device("cpu"))


def test_a_rank_idles_in_the_last_round_when_the_batches_do_not_divide():
    from trainer.eval_part import Part

    idle = {read: [Part(rank, 3).idles_last_round(read) for rank in range(3)] for read in (0, 1, 4, 5, 6)}
    assert idle == {
        0: [False, False, False],
        1: [False, True, True],
        4: [False, True, True],
        5: [False, False, True],
        6: [False, False, False],
    }
