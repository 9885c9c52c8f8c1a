from collections import Counter

import pyarrow.csv as pacsv
import pytest

from data_sharding.synth import SynthConfig, generate


def test_generates_exactly_the_requested_number_of_events(tmp_path):
    n = generate(SynthConfig(events=5_000, users=100, items=50), tmp_path / "e.csv", tmp_path / "i.csv")
    table = pacsv.read_csv(tmp_path / "e.csv")
    assert n == 5_000 == table.num_rows
    assert set(table.column_names) == {"user_id", "item_id", "timestamp", "event_type", "rating"}
    assert table.column("user_id").to_pylist().count("u0") >= 3
    assert pacsv.read_csv(tmp_path / "i.csv").num_rows == 50


def test_same_seed_gives_the_same_file(tmp_path):
    cfg = SynthConfig(events=3_000, users=50, items=40, seed=3)
    generate(cfg, tmp_path / "a.csv")
    generate(cfg, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_sequences_carry_learnable_transitions(tmp_path):
    """The most common successor of an item is followed far more often than chance."""
    generate(SynthConfig(events=20_000, users=200, items=100, seed=1), tmp_path / "e.csv")
    table = pacsv.read_csv(tmp_path / "e.csv").sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    users, items = table["user_id"].to_pylist(), table["item_id"].to_pylist()
    pairs = Counter((a, b) for u1, u2, a, b in zip(users, users[1:], items, items[1:], strict=False) if u1 == u2)
    by_prev = Counter()
    best = Counter()
    for (a, _), n in pairs.items():
        by_prev[a] += n
        best[a] = max(best[a], n)
    hit_rate = sum(best.values()) / sum(by_prev.values())
    assert hit_rate > 5 / 100  # uniform guessing over 100 items would give about 0.01


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="at least"):
        SynthConfig(events=10, users=100)
