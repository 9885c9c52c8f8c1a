"""Sequences, vocabulary, de-duplication, generations and atomic publishing."""

import hashlib
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import shard, write_lines
from test_ingest import all_events

from data_sharding import pipeline, writer
from data_sharding.errors import DataError
from data_sharding.shards import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID, load_manifest
from data_sharding.stream import ShardDataset, StreamConfig
from data_sharding.vocab import NUM_RESERVED_ITEMS

HEADER = "user_id,item_id,timestamp,event_type,rating"


def items_by_name(out, manifest):
    table = pq.read_table(out / manifest["vocab"]["files"]["items"])
    return dict(zip(table["item"].to_pylist(), table["id"].to_pylist(), strict=True))


def test_sequences_are_ordered_by_time_then_input_order(tmp_path):
    rows = [
        "u1,c,1600000300,view,1",
        "u1,a,1600000100,view,1",
        "u1,b,1600000200,view,1",
        "u1,y,1600000200,click,1",  # same second as b, later in the file
        "u1,x,1600000200,view,2",
    ]
    manifest = shard([write_lines(tmp_path / "e.csv", [HEADER, *rows])], tmp_path / "out")
    ids = items_by_name(tmp_path / "out", manifest)
    events = all_events(tmp_path / "out")[0]
    assert events["item"].tolist() == [ids[k] for k in ("a", "b", "y", "x", "c")]


def test_exact_duplicates_are_dropped_and_counted(tmp_path):
    rows = [
        "u1,a,1600000100,view,1",
        "u1,b,1600000100,view,1",
        "u1,a,1600000100,view,1",  # exact duplicate of the first row
        "u1,a,1600000100,view,2",  # different value: kept
        "u1,a,1600000100,click,1",  # different type: kept
        "u2,a,1600000100,view,1",  # different user: kept
    ]
    manifest = shard([write_lines(tmp_path / "e.csv", [HEADER, *rows])], tmp_path / "out")
    assert manifest["generations"][0]["counts"]["duplicates"] == 1
    events = all_events(tmp_path / "out")
    assert len(events[0]) == 4 and len(events[1]) == 1


def test_item_ids_follow_frequency_then_id_and_min_count_drops_rare_items(tmp_path):
    rows = [f"u{k},{item},{1600000000 + k},view,1" for k, item in enumerate("bbbaaa9zz" + "10" * 2)]
    rows += ["u99,rare,1600000000,view,1"]
    manifest = shard([write_lines(tmp_path / "e.csv", [HEADER, *rows])], tmp_path / "out", min_item_count=2)
    ids = items_by_name(tmp_path / "out", manifest)
    assert list(ids)[:NUM_RESERVED_ITEMS] == ["[PAD]", "[UNK]", "[MASK]"]
    # a and b tie at 3 events: "a" < "b"; 0 and 1 and z tie at 2: numeric ids first, in numeric order.
    assert [k for k in ids if ids[k] >= NUM_RESERVED_ITEMS] == ["a", "b", "0", "1", "z"]
    assert "rare" not in ids and "9" not in ids
    assert manifest["generations"][0]["counts"]["rare_item_events"] == 2


def test_leave_one_out_marks_last_event_test_and_second_to_last_valid(dataset):
    for events in list(all_events(dataset).values())[:50]:
        flags = events["split"].tolist()
        if len(flags) >= 3:
            assert flags[-2:] == [SPLIT_VALID, SPLIT_TEST]
            assert set(flags[:-2]) == {SPLIT_TRAIN}
        else:
            assert set(flags) == {SPLIT_TRAIN}


def test_time_split_marks_events_after_the_cutoffs(tmp_path):
    rows = [f"u1,i{k},2021-01-{k + 1:02d}T00:00:00Z,view,1" for k in range(6)]
    shard(
        [write_lines(tmp_path / "e.csv", [HEADER, *rows])],
        tmp_path / "out",
        split=pipeline.SplitConfig("time", valid_start="2021-01-04", test_start="2021-01-06"),
    )
    assert all_events(tmp_path / "out")[0]["split"].tolist() == [0, 0, 0, 1, 1, 2]


def test_rerun_gives_byte_identical_shards(tmp_path, synth_log, dataset):
    events, items = synth_log
    manifest = shard([events], tmp_path / "again", items=str(items), events_per_shard=4_000)
    first = load_manifest(dataset)
    assert [s["sha256"] for s in manifest["generations"][0]["shards"]] == [
        s["sha256"] for s in first["generations"][0]["shards"]
    ]
    assert len(first["generations"][0]["shards"]) == 8


def test_existing_dataset_is_not_replaced_without_overwrite(tmp_path):
    path = write_lines(tmp_path / "e.csv", [HEADER, "u1,a,1600000000,view,1"])
    shard([path], tmp_path / "out")
    with pytest.raises(DataError, match="--append .* --overwrite"):
        shard([path], tmp_path / "out")
    shard([path], tmp_path / "out", overwrite=True)
    assert load_manifest(tmp_path / "out")["generation"] == 1


def digest_tree(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_append_keeps_ids_adds_new_items_and_carries_history(tmp_path):
    old = write_lines(
        tmp_path / "old.csv",
        [HEADER] + [f"u{u},i{(u + k) % 5},{1600000000 + 10 * k},view,1" for u in range(4) for k in range(5)],
    )
    out = tmp_path / "out"
    first = shard([old], out)
    before = digest_tree(out / "g0001")
    new = write_lines(
        tmp_path / "new.csv",
        [HEADER, "u1,i0,1700000000,view,1", "u1,brand_new,1700000100,view,1", "u9,i2,1700000000,view,1"],
    )
    second = shard([new], out, append=True)
    assert second["generation"] == 2 and len(second["generations"]) == 2
    assert digest_tree(out / "g0001") == before  # earlier generation intact
    old_ids, new_ids = items_by_name(out, first), items_by_name(out, second)
    assert all(new_ids[k] == v for k, v in old_ids.items())
    assert new_ids["brand_new"] == max(old_ids.values()) + 1
    assert second["generations"][1]["counts"]["new_items"] == 1

    gen2 = all_events(out)  # "state": every user's latest sequence
    users = pq.read_table(out / second["vocab"]["files"]["users"]).to_pylist()
    uidx = {u["user"]: u["uidx"] for u in users}
    assert {u["user"]: u["last_generation"] for u in users} == {"u0": 1, "u1": 2, "u2": 1, "u3": 1, "u9": 2}
    u1 = gen2[uidx["u1"]]
    assert len(u1) == 7 and u1["new"].tolist() == [0] * 5 + [1, 1]
    assert u1["item"][-1] == new_ids["brand_new"]
    assert gen2[uidx["u9"]]["new"].tolist() == [1]
    # Only touched users are in generation 2's shards.
    assert second["generations"][1]["counts"]["users_in_shards"] == 2


def test_append_drops_events_duplicating_history(tmp_path):
    path = write_lines(tmp_path / "e.csv", [HEADER, "u1,a,1600000000,view,1", "u1,b,1600000100,view,1"])
    shard([path], tmp_path / "out")
    again = write_lines(tmp_path / "again.csv", [HEADER, "u1,b,1600000100,view,1", "u1,c,1600000200,view,1"])
    manifest = shard([again], tmp_path / "out", append=True)
    assert manifest["generations"][1]["counts"]["duplicates"] == 1
    assert manifest["generations"][1]["counts"]["new_events"] == 1


def test_interrupted_append_leaves_the_previous_manifest_valid(tmp_path, monkeypatch):
    path = write_lines(tmp_path / "e.csv", [HEADER, "u1,a,1600000000,view,1", "u1,b,1600000100,view,1"])
    out = tmp_path / "out"
    shard([path], out)
    manifest_before = (out / "manifest.json").read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_shards", crash)
    with pytest.raises(KeyboardInterrupt):
        shard([path], out, append=True)
    assert (out / "manifest.json").read_bytes() == manifest_before
    assert not (out / "g0002").exists()
    assert sorted(p.name for p in out.iterdir()) == ["g0001", "manifest.json"]
    assert json.loads(manifest_before)["generation"] == 1
    assert len(all_events(out)[0]) == 2


def test_item_titles_are_stored_in_the_vocabulary(dataset):
    manifest = load_manifest(dataset)
    items = pq.read_table(dataset / manifest["vocab"]["files"]["items"]).to_pylist()
    real = items[NUM_RESERVED_ITEMS:]
    assert all(row["title"] for row in real)
    counts = np.array([row["count"] for row in real])
    assert (np.diff(counts) <= 0).all()


@pytest.mark.slow
def test_sigkill_at_any_point_of_an_append_leaves_a_loadable_dataset(tmp_path, synth_log):
    """Kill `bgpt shard --append` at several moments: the dataset always loads at generation 1 or 2."""
    import signal
    import subprocess
    import sys
    import time

    events, items = synth_log
    out = tmp_path / "out"
    shard([events], out, items=str(items), events_per_shard=4_000)
    original = load_manifest(out)
    cmd = [sys.executable, "-m", "launch.cli", "shard", "--append", "--input", str(events), "--out", str(out)]
    outcomes = set()
    for delay in (0.05, 0.3, 0.6, 0.9, 1.2, 1.6):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manifest = load_manifest(out)
        assert manifest["generation"] in (1, 2)
        outcomes.add(manifest["generation"])
        assert manifest["generations"][0] == original["generations"][0]
        assert len(all_events(out)) == 600
        if manifest["generation"] == 2:
            break
    assert 1 in outcomes  # at least one kill landed mid-run
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # a rerun completes
    assert load_manifest(out)["generation"] in (2, 3)


def test_append_whose_new_events_touch_only_some_known_items(tmp_path):
    """Regression: the returning user's history holds known ids the new events never mention."""
    from data_sharding.stream import iter_sequences

    head = "user,item,ts"
    first = write_lines(tmp_path / "a.csv", [head] + [f"u1,i{k},{1_600_000_000 + k}" for k in range(10)])
    second = write_lines(tmp_path / "b.csv", [head, "u1,i0,1700000000"])
    out = tmp_path / "out"
    shard([first], out)
    manifest = shard([second], out, append=True)
    assert manifest["generation"] == 2 and manifest["vocab"]["num_items"] == 13
    (events,) = [e for _, e in iter_sequences(out)]
    assert len(events) == 11 and sorted(set(events["item"].tolist())) == list(range(3, 13))


def test_shard_multiple_rounds_the_shard_count_up_for_the_readers(tmp_path, synth_log):
    events, _ = synth_log
    manifest = shard([events], tmp_path / "ds", events_per_shard=4_000, shard_multiple=6)
    count = len(manifest["generations"][0]["shards"])
    assert count % 6 == 0 and count == 12  # 8 by size, rounded up to a multiple of 6
    assert manifest["totals"]["events"] == sum(s["events"] for s in manifest["generations"][0]["shards"])


def test_a_log_with_fewer_users_than_shards_writes_empty_shards_that_read_as_nothing(tmp_path):
    # One user, four shards (--shard-multiple 4): three shards get no user. They used to crash the writer.
    rows = [HEADER, *(f"u1,i{t % 3},{1_600_000_000 + t},view," for t in range(6))]
    manifest = shard([write_lines(tmp_path / "e.csv", rows)], tmp_path / "ds", shard_multiple=4)
    shards = manifest["generations"][0]["shards"]
    assert len(shards) == 4 and sorted(s["users"] for s in shards) == [0, 0, 0, 1]
    dataset = ShardDataset(tmp_path / "ds", StreamConfig(max_len=8, batch_size=4, shuffle=False))
    assert dataset.num_samples == 1
    (batch,) = list(dataset)
    assert batch["items"].shape[0] == 1


def test_appended_generations_keep_every_touched_users_history_items(tmp_path):
    """Regression: the events log once held provisional item codes instead of final ids, so each
    --append re-read touched users' earlier events as the wrong items. Here frequency order differs
    from id order (so codes and ids differ), over three generations, and a generation-2 item sits
    in the history that generation 3 re-reads: every user's sequence must decode to its raw events."""
    from data_sharding.stream import iter_sequences

    head = "user,item,ts,event_type"
    raw = {
        1: [("u1", "a", 1), ("u1", "z", 2), ("u2", "z", 3), ("u3", "z", 4), ("u2", "m", 5), ("u3", "m", 6)],
        2: [("u1", "new2", 10), ("u4", "new2", 11), ("u4", "b", 12), ("u2", "a", 13)],
        3: [("u1", "new3", 20), ("u4", "z", 21), ("u5", "new3", 22)],
    }
    out = tmp_path / "out"
    for gen, rows in raw.items():
        path = write_lines(
            tmp_path / f"g{gen}.csv",
            [head] + [f"{u},{i},{1_600_000_000 + t},{'buy' if t % 2 else 'view'}" for u, i, t in rows],
        )
        manifest = shard([path], out, append=gen > 1)
    table = pq.read_table(out / manifest["vocab"]["files"]["items"])
    names = dict(zip(table["id"].to_pylist(), table["item"].to_pylist(), strict=True))
    users = pq.read_table(out / manifest["vocab"]["files"]["users"]).to_pylist()
    user_name = {u["uidx"]: u["user"] for u in users}
    types = manifest["vocab"]["event_types"]
    got = {
        user_name[uidx]: [(names[int(i)], types[int(k)]) for i, k in zip(ev["item"], ev["type"], strict=True)]
        for uidx, ev in iter_sequences(out)
    }
    expected: dict[str, list] = {}
    for rows in raw.values():
        for u, i, t in rows:
            expected.setdefault(u, []).append((i, "buy" if t % 2 else "view"))
    assert got == expected
