"""Vocabularies: reserved ids first, new ids by frequency then id, and appended generations never renumber."""

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_sharding import vocab


def build_generation(events, generation, previous=None, previous_users=None, min_count=1):
    """Run the vocabulary steps of one generation over ``(user, item, event_type)`` rows, as the
    pipeline does: provisional codes in SQL, counts per code (every event here is new), final ids."""
    con = duckdb.connect()
    con.register(
        "raw_events", pa.table({k: [e[i] for e in events] for i, k in enumerate(("user", "item", "event_type"))})
    )
    con.execute("CREATE TABLE ev AS SELECT * FROM raw_events")
    user_counts = "(SELECT user, count(*) AS n FROM ev GROUP BY user)"
    n_items, n_types = vocab.create_code_tables(con, previous, previous_users, "ev", "ev", user_counts)
    item_codes = con.execute("SELECT c.code FROM ev JOIN item_codes c ON ev.item = c.key").fetchnumpy()["code"]
    type_codes = con.execute("SELECT c.code FROM ev JOIN type_codes c ON ev.event_type = c.key").fetchnumpy()["code"]
    item_counts = np.bincount(item_codes, minlength=n_items)
    type_counts = np.bincount(type_codes, minlength=n_types)
    num_known = previous.num_items if previous else vocab.NUM_RESERVED_ITEMS
    num_known_types = previous.num_event_types if previous else vocab.NUM_RESERVED_TYPES
    item_map = vocab.finalize_codes(item_counts, num_known, min_count)
    type_map = vocab.finalize_codes(type_counts, num_known_types, 1)
    new = vocab.build_vocab(con, generation, previous, item_map, item_counts, type_map, type_counts, False)
    users = dict(con.execute("SELECT user, uidx FROM user_codes").fetchall())
    return new, users


def names(v):
    return v.items["item"].to_pylist()


GEN1 = [
    ("2", "b", "view"),
    ("2", "b", "view"),
    ("10", "b", "click"),
    ("10", "a", "view"),
    ("bob", "a", "view"),
    ("bob", "a", "click"),
    ("bob", "10", "view"),
    ("bob", "10", "view"),
    ("2", "9", "view"),
    ("2", "9", "click"),
    ("10", "z", "view"),
]


def test_reserved_ids_come_first_then_items_by_count_then_numeric_before_text_ids():
    first, _ = build_generation(GEN1, 1)
    assert vocab.RESERVED_ITEMS == ("[PAD]", "[UNK]", "[MASK]")
    assert (vocab.PAD_ITEM, vocab.UNK_ITEM, vocab.MASK_ITEM) == (0, 1, 2)
    # a and b: 3 events each ("a" < "b"); 9 and 10: 2 each (numeric ids in numeric order); z: 1.
    assert names(first) == ["[PAD]", "[UNK]", "[MASK]", "a", "b", "9", "10", "z"]
    assert first.items["id"].to_pylist() == list(range(8))
    assert first.items["count"].to_pylist() == [0, 0, 0, 3, 3, 2, 2, 1]
    assert first.items["generation"].to_pylist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert first.num_items == 8
    # Event types: id 0 is padding; view (8 events) before click (3).
    assert first.event_types == ["[PAD]", "view", "click"]
    assert first.type_counts == [0, 8, 3]
    assert first.num_event_types == 3


def test_new_items_under_the_minimum_count_get_no_id():
    first, _ = build_generation(GEN1, 1, min_count=2)
    assert names(first) == ["[PAD]", "[UNK]", "[MASK]", "a", "b", "9", "10"]


def test_an_appended_generation_keeps_every_id_and_appends_new_ones_after_them(tmp_path):
    first, users1 = build_generation(GEN1, 1)
    vocab.save_vocab(tmp_path, first)
    previous = vocab.load_vocab(tmp_path)
    users_file = tmp_path / "users.parquet"
    pq.write_table(pa.table({"user": list(users1), "uidx": pa.array(list(users1.values()), pa.int32())}), users_file)
    gen2 = [
        ("10", "z", "view"),
        ("alice", "new2", "buy"),
        ("alice", "new1", "view"),
        ("3", "new1", "view"),
        ("3", "0", "view"),
        ("3", "a", "click"),
    ]
    second, users2 = build_generation(gen2, 2, previous, users_file)

    assert names(second)[: first.num_items] == names(first)  # no existing id moves
    # New ids after the old ones: new1 (2 events) first, then "0" before "new2" (1 each, numeric first).
    assert names(second)[first.num_items :] == ["new1", "0", "new2"]
    assert second.items["count"].to_pylist() == [0, 0, 0, 4, 3, 2, 2, 2, 2, 1, 1]
    assert second.items["generation"].to_pylist() == [0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert second.event_types == ["[PAD]", "view", "click", "buy"]
    assert second.type_counts == [0, 12, 4, 1]
    # Users: numeric ids first in numeric order, then text; known users keep their index.
    assert users1 == {"2": 0, "10": 1, "bob": 2}
    assert users2 == {"10": 1, "3": 3, "alice": 4}


def test_the_version_names_the_generation_and_changes_with_the_ids():
    first, _ = build_generation(GEN1, 1)
    again, _ = build_generation(GEN1, 1)
    fewer, _ = build_generation(GEN1, 1, min_count=2)
    assert first.version == vocab.vocab_version(1, names(first), first.event_types)
    assert first.version.startswith("g0001-") and len(first.version) == len("g0001-") + 12
    assert again.version == first.version
    assert fewer.version != first.version


def test_a_saved_vocabulary_loads_back_and_describes_itself_for_the_manifest(tmp_path):
    first, _ = build_generation(GEN1, 1)
    files = vocab.save_vocab(tmp_path, first)
    assert files == {"vocab": "vocab.json", "items": "items.parquet"}
    loaded = vocab.load_vocab(tmp_path)
    assert loaded.items.equals(first.items)
    assert (loaded.generation, loaded.version) == (1, first.version)
    assert (loaded.event_types, loaded.type_counts) == (first.event_types, first.type_counts)
    entry = vocab.manifest_entry(first, "g0001", {**files, "users": "users.parquet"})
    assert entry == {
        "version": first.version,
        "dir": "g0001",
        "files": {"vocab": "g0001/vocab.json", "items": "g0001/items.parquet", "users": "g0001/users.parquet"},
        "num_items": 8,
        "num_reserved_items": 3,
        "num_event_types": 3,
        "event_types": ["[PAD]", "view", "click"],
    }


@pytest.mark.parametrize(
    ("counts", "num_known", "min_count", "expected"),
    [
        # codes 0-2 reserved; new codes 3..6 with counts 1, 5, 5, 2 take ids in the order 4, 5 (tie: lower code first), 6, 3
        ([0, 0, 0, 1, 5, 5, 2], 3, 1, [0, 1, 2, 6, 3, 4, 5]),
        ([0, 0, 0, 1, 5, 5, 2], 3, 2, [0, 1, 2, -1, 3, 4, 5]),
        # codes 3 and 4 known (kept whatever their count); new code 5 follows them
        ([0, 0, 0, 0, 9, 1], 5, 1, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_finalize_codes_keeps_known_codes_and_orders_new_ones_by_count(counts, num_known, min_count, expected):
    mapping = vocab.finalize_codes(np.array(counts), num_known, min_count)
    assert mapping.tolist() == expected
