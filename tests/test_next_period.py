"""Next-period evaluation and the count baselines, on tiny hand-made logs with known answers."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import shard, shard_generations, tiny_config, write_lines

from data_sharding.sequences import SplitConfig
from launch.cli import main
from trainer.baselines import BaselineParams, Popularity, Transition
from trainer.errors import ConfigError
from trainer.evaluate import EvalConfig, repeat_share, resolve_exclude_seen
from trainer.next_period import evaluate_next_period
from trainer.periods import resolve_period
from trainer.run import evaluate_on_period, train_run

HEAD = "user,item,ts"
T0 = 1_600_000_000
# Generation 1: b is the most popular item (3 events), then a and c (2 each: ids by name).
GEN1 = [("u1", "a", 100), ("u1", "b", 200), ("u1", "c", 300), ("u2", "a", 110), ("u2", "b", 210)]
GEN1 += [("u3", "b", 120), ("u3", "c", 220)]
# Generation 2 (the period): u1 sees a new item d, then comes back to a (a repeat); u2 sees c;
# u4 is new: its first event (a) has nothing before it, its second (b) has a as context.
GEN2 = [("u1", "d", 1000), ("u1", "a", 1100), ("u2", "c", 1010), ("u4", "a", 1020), ("u4", "b", 1030)]


def two_generations(tmp_path):
    return shard_generations(tmp_path, [GEN1, GEN2], T0)


def hits(ranks: list[int], k: int) -> float:
    return sum(r < k for r in ranks) / len(ranks)


def ndcg(ranks: list[int], k: int) -> float:
    return sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)


def scored(data, kinds, exclude_seen, ks=(1, 10)):
    cfg = EvalConfig(ks=list(ks), exclude_seen=exclude_seen)
    return evaluate_next_period(None, data, resolve_period(data), cfg, kinds, log=lambda *a: None)


def test_period_summary_counts_context_cold_items_and_repeats(tmp_path):
    data = two_generations(tmp_path)
    summary = scored(data, ["popularity"], exclude_seen=False)["summary"]
    assert summary["period"]["generation"] == 2
    assert summary["events"] == 5 and summary["scored"] == 4 and summary["without_context"] == 1
    assert summary["users"] == 3 and summary["new_users"] == 1
    assert summary["cold_events"] == 1  # d: first seen in the period
    assert summary["repeat_share"] == 0.25  # u1 coming back to a
    assert summary["tied_share"] == 0.0


def test_events_at_the_time_of_the_one_before_are_counted_apart(tmp_path):
    """A tie (same time as the user's event before it) is ordered only by the file: its own group."""
    tied = [("u1", "d", 1000), ("u1", "a", 1000), *GEN2[2:]]  # u1's a now shares d's time
    data = shard_generations(tmp_path, [GEN1, tied], T0)
    result = scored(data, ["popularity"], exclude_seen=False)
    assert result["summary"]["tied_share"] == 0.25
    groups = result["scorers"]["popularity"]["breakdown"]
    assert groups["tied_events"]["count"] == 1 and groups["untied_events"]["count"] == 3
    assert groups["tied_events"]["hr@10"] == 1.0  # a, by popularity at rank 1


def test_popularity_by_hand_with_and_without_history(tmp_path):
    data = two_generations(tmp_path)
    # Counts before the period: b 3 > a 2 = c 2 (a first: smaller id) > d 0.
    # Scored in user order: u1 d, u1 a, u2 c, u4 b.
    plain = scored(data, ["popularity"], exclude_seen=False)["scorers"]["popularity"]
    ranks = [3, 1, 2, 0]
    assert plain["overall"]["hr@1"] == pytest.approx(hits(ranks, 1))
    assert plain["overall"]["ndcg@10"] == pytest.approx(ndcg(ranks, 10), abs=1e-6)
    assert plain["breakdown"]["cold_items"]["mrr"] == pytest.approx(1 / 4)  # d at rank 3
    assert plain["breakdown"]["new_users"]["hr@1"] == 1.0  # u4's b
    # History excluded: u1's d and u2's c and u4's b all come first; u1's a (a repeat) cannot be hit.
    unseen = scored(data, ["popularity"], exclude_seen=True)["scorers"]["popularity"]
    assert unseen["overall"]["hr@1"] == pytest.approx(3 / 4)
    assert unseen["breakdown"]["repeat_items"]["hr@10"] == 0.0
    assert unseen["breakdown"]["first_event"]["hr@1"] == 1.0  # u1's d and u2's c
    assert unseen["breakdown"]["later_events"]["count"] == 2  # u1's a and u4's b


def test_transition_reads_context_from_the_period_itself(tmp_path):
    data = two_generations(tmp_path)
    # Pairs before the period: a->b (u1, u2), b->c (u1, u3). u4's b follows a, its own first event
    # in the period (read as context, never scored): P(b | a) = 1 puts b first.
    result = scored(data, ["transition"], exclude_seen=False)
    assert result["baselines"]["transition"]["chosen_on"] is None  # generation 1 is the first
    by_group = result["scorers"]["transition"]["breakdown"]
    assert by_group["new_users"]["hr@1"] == 1.0
    # u2's c follows b: P(c | b) = 1. u1's d follows c (no pair from c): popularity fills, d last.
    assert by_group["first_event"]["mrr"] == pytest.approx((1 / 4 + 1) / 2)


def test_a_time_range_and_the_stored_split_are_periods_too(tmp_path):
    data = two_generations(tmp_path)
    # [1010 s, 1030 s): u2's c and u4's a (no context); later events are cut off, never context.
    period = resolve_period(data, start=(T0 + 1010) * 1000, end=(T0 + 1030) * 1000)
    result = evaluate_next_period(
        None, data, period, EvalConfig(ks=[1], exclude_seen=False), ["popularity"], log=lambda *a: None
    )
    assert result["summary"]["events"] == 2 and result["summary"]["scored"] == 1
    iso = resolve_period(data, start="2020-09-13T12:26:40Z")
    assert iso.start_ms == T0 * 1000
    assert resolve_period(data, split="test").split == "test"


def test_bad_periods_are_one_clear_line(tmp_path):
    data = two_generations(tmp_path)
    with pytest.raises(ConfigError, match="is not before"):
        resolve_period(data, start=2000, end=1000)
    with pytest.raises(ConfigError, match="choose 2..2"):
        resolve_period(data, generation=1)
    with pytest.raises(ConfigError, match="ISO 8601"):
        resolve_period(data, start="yesterday")
    single = tmp_path / "single"
    shard([write_lines(tmp_path / "one.csv", [HEAD, f"u1,a,{T0}", f"u1,b,{T0 + 1}"])], single)
    with pytest.raises(ConfigError, match="one generation and no time split"):
        resolve_period(single)
    empty = resolve_period(data, start=(T0 + 5000) * 1000)
    with pytest.raises(ConfigError, match="has no events"):
        evaluate_next_period(
            None, data, empty, EvalConfig(ks=[1], exclude_seen=False), ["popularity"], log=lambda *a: None
        )


def test_transition_scores_by_hand_with_steps_and_decay():
    # Items 3, 4, 5. One user: 3 (day 0) -> 4 (day 10) -> 5 (day 20). Two steps, 10-day half-life.
    fit = Transition(6, BaselineParams(steps=2, half_life_days=10.0))
    day = 86_400_000
    fit.add_user(np.array([3, 4, 5]), np.array([0, 10 * day, 20 * day]))
    fit.finish()
    # Pairs (weight 1/distance x 2^-age/10d, age from the newest event): 3->4 (1 x 0.5),
    # 4->5 (1 x 1), 3->5 (1/2 x 1). P(. | 3) = 4: 0.5 / 1.0, 5: 0.5 / 1.0; P(5 | 4) = 1.
    items = torch.tensor([[3, 4, 0]])
    batch = {"items": items, "mask": torch.tensor([[True, True, False]])}
    scores = fit(batch, torch.tensor([0]), torch.tensor([1]), batch["mask"])[0]
    # The query's last two items: 4 (weight 1), 3 (weight 1/2). Score(5) = 1 x 1 + 1/2 x 0.5.
    assert float(scores[5]) == pytest.approx(1.25, abs=1e-9)
    assert float(scores[4]) == pytest.approx(0.25, abs=1e-9)  # only via 3 (1/2 x 0.5)
    assert float(scores[3]) == pytest.approx(0.0, abs=1e-9)  # nothing leads to 3: popularity fill only
    assert torch.isinf(scores[:3]).all()


def test_recent_popularity_counts_only_the_trailing_window():
    day = 86_400_000
    fit = Popularity(5, BaselineParams(window_days=2))
    fit.add_user(np.array([3, 3, 3, 4]), np.array([0, 1, 2, 10 * day]))
    fit.add_user(np.array([4]), np.array([9 * day]))
    fit.finish()
    assert fit.counts[3:].tolist() == [0.0, 2.0]  # days 8-10 only


def repeat_log(tmp_path, repeats: bool):
    rows = [HEAD]
    for u in range(20):
        items = ["x", "y", "x", "z", "x"] if repeats else ["a", "b", "c", "d", "e"]
        rows += [f"u{u},{item}{'' if repeats else u % 3},{T0 + 10 * t}" for t, item in enumerate(items)]
    out = tmp_path / ("repeats" if repeats else "fresh")
    shard([write_lines(tmp_path / f"{out.name}.csv", rows)], out)
    return out


def test_exclude_seen_auto_follows_the_repeat_share(tmp_path):
    fresh, repeats = repeat_log(tmp_path, False), repeat_log(tmp_path, True)
    # Training events (loo keeps 3 of 5 per user): x y x -> 1 of 2 next events repeats.
    assert repeat_share(fresh)[0] == 0.0
    assert repeat_share(repeats)[0] == pytest.approx(0.5)
    assert resolve_exclude_seen("auto", fresh, log=lambda *a: None) is True
    assert resolve_exclude_seen("auto", repeats, log=lambda *a: None) is False
    assert resolve_exclude_seen(False, fresh, log=lambda *a: None) is False


def test_a_run_on_an_older_vocabulary_counts_unseen_items_as_misses(tmp_path):
    first = tmp_path / "g1.csv"
    write_lines(first, [HEAD] + [f"u{u},i{(u + t) % 6},{T0 + 60 * t}" for u in range(30) for t in range(8)])
    data = tmp_path / "data"
    shard([first], data, split=SplitConfig("none"))
    run = tmp_path / "run"
    train_run(run, tiny_config(data, max_steps=6), log=lambda *a: None)
    later = [f"u{u},{'brand_new' if u % 2 else f'i{u % 6}'},{T0 + 10_000 + u}" for u in range(10)]
    shard([write_lines(tmp_path / "g2.csv", [HEAD, *later])], data, append=True)
    messages = []
    result = evaluate_on_period([run], baseline_kinds=["popularity"], log=messages.append)
    assert result["model"]["known_items"] == 3 + 6 and not result["model"]["encodes_cold_items"]
    assert result["model"]["unknown_targets"] == 5
    assert sum("never saw" in m for m in messages) == 1  # said once, not an error
    assert result["scorers"]["model"]["breakdown"]["cold_items"]["hr@10"] == 0.0
    assert result["scorers"]["model"]["overall"]["count"] == result["scorers"]["popularity"]["overall"]["count"] == 10


def test_cli_next_period_and_baselines(tmp_path, capsys):
    data = two_generations(tmp_path)
    out = tmp_path / "result.json"
    code = main(["baseline", "popularity", "transition", "--data", str(data), "--protocol", "next-period"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "generation 2: 4 events scored of 5" in printed and "transition" in printed
    assert main(["baseline", "popularity", "--data", str(data), "--protocol", "next-period", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["breakdown"]["cold_items"]["count"] == 1
    printed = capsys.readouterr()  # one baseline: stdout is its JSON alone (`> file`); decisions on stderr
    assert json.loads(printed.out) == json.loads(out.read_text()) and "exclude_seen auto" in printed.err
    assert main(["baseline", "popularity", "--data", str(data), "--split", "test"]) == 2  # --split none: no test
    assert "has no events" in capsys.readouterr().err
    assert main(["baseline", "popularity", "--data", str(data), "--protocol", "next-period", "--from", "x"]) == 2


def cyclic_generations(tmp_path, split: str = "none"):
    """Two generations of users walking 6 items in order (perfectly learnable), the second later."""
    data = tmp_path / "cyc"
    for gen, start in ((1, T0), (2, T0 + 100_000)):
        offset = 8 * (gen - 1)  # generation 2 continues each walk where generation 1 left it
        rows = [f"u{u},i{(u + offset + t) % 6},{start + 60 * t}" for u in range(30) for t in range(8)]
        shard([write_lines(tmp_path / f"c{gen}.csv", [HEAD, *rows])], data, append=gen == 2, split=SplitConfig(split))
    return data


def test_state_until_a_generation_reads_each_users_sequence_as_it_stood_then(tmp_path):
    from data_sharding.stream import ShardDataset, StreamConfig, iter_sequences

    data = cyclic_generations(tmp_path)
    then = {u: len(e) for u, e in iter_sequences(data, until_generation=1)}
    now = {u: len(e) for u, e in iter_sequences(data)}
    assert set(then.values()) == {8} and set(now.values()) == {16}
    windows = ShardDataset(data, StreamConfig(max_len=50, until_generation=1)).num_samples
    assert windows == 30  # one window of 8 events (7 targets) per user, none of generation 2
    with pytest.raises(Exception, match="no generation 3"):
        ShardDataset(data, StreamConfig(until_generation=3))


def test_validate_on_newest_trains_before_it_and_validates_next_period(tmp_path):
    data = cyclic_generations(tmp_path)
    cfg = tiny_config(data, max_steps=40, eval_every=20)
    cfg.data.validate_on_newest = True
    metrics = train_run(tmp_path / "run", cfg, log=lambda *a: None)
    assert metrics["protocol"] == "next-period" and metrics["period"] == "generation 2"
    assert metrics["count"] == 30 * 8  # every event of generation 2 has history (generation 1)
    assert metrics["hr@1"] > 0.9  # the cycle continues across the generation boundary
    log = [json.loads(line) for line in (tmp_path / "run" / "valid_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [20, 40]
    # It trained on generation 1 only: 30 users x 7 targets per epoch.
    assert metrics["train"]["tokens"] <= 40 * 16 * 7


def test_data_without_a_valid_split_keeps_the_latest_weights_and_has_no_test(tmp_path):
    data = cyclic_generations(tmp_path)
    messages = []
    metrics = train_run(tmp_path / "run", tiny_config(data, max_steps=10, eval_every=5), log=messages.append)
    assert metrics["count"] == 0 and any("no test split" in m for m in messages)
    assert any("nothing held out" in m for m in messages)


def test_query_time_conditions_only_the_item_scores(tmp_path):
    data = cyclic_generations(tmp_path)
    cfg = tiny_config(data, max_steps=5)
    cfg.model.query_time = True
    train_run(tmp_path / "run", cfg, log=lambda *a: None)
    from trainer.run import load_run_model

    model, _, _ = load_run_model(tmp_path / "run", log=lambda *a: None)
    batch = {
        k: v
        for k, v in next(iter(__import__("trainer.evaluate", fromlist=["x"]).eval_loader(data, "train", 50, 4))).items()
    }
    rows, pos = torch.arange(2), torch.tensor([3, 4])
    table = model.items.table()
    with torch.no_grad():
        plain = model.hidden_states(batch, table)[rows, pos]
        conditioned = model.query_states(batch, table, rows, pos)
        gap = batch["times"][rows, pos + 1] - batch["times"][rows, pos]
        from trainer.heads import time_bucket

        expected = plain + model.query_gaps(time_bucket(gap, model.cfg.time_buckets))
    assert torch.allclose(conditioned, expected)
    assert not torch.allclose(conditioned, plain)


def test_an_earlier_generation_is_predicted_from_the_data_as_it_stood_then(tmp_path):
    data = two_generations(tmp_path)
    later = [HEAD, f"u1,z,{T0 + 5000}", f"u2,z,{T0 + 5001}"]  # generation 3: never context for 2
    shard([write_lines(tmp_path / "g3.csv", later)], data, append=True)
    result = evaluate_next_period(
        None, data, resolve_period(data, generation=2), EvalConfig(ks=[1], exclude_seen=False), ["popularity"]
    )
    assert result["summary"]["events"] == 5 and result["summary"]["scored"] == 4
    # Item z (generation 3) is not in generation 2's catalogue: coverage counts 4 real items, not 5.
    assert result["scorers"]["popularity"]["overall"]["coverage@1"] == pytest.approx(1 / 4)
    newest = resolve_period(data)
    assert newest.generation == 3
    assert (
        evaluate_next_period(None, data, newest, EvalConfig(ks=[1], exclude_seen=False), ["transition"])["baselines"][
            "transition"
        ]["chosen_on"]
        == "generation 2"
    )
