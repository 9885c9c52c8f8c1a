"""The one-machine engine sorts large inputs partition by partition (whole shards per partition):
the dataset it writes is byte-identical to a single global sort's, appends included."""

import json

import pytest
from conftest import comparable, shard, tree, write_lines

from data_sharding import duckdb_engine, sequences
from data_sharding.errors import DataError


def build(tmp_path, name, inputs, partitioned: bool, monkeypatch, **kwargs) -> dict:
    # 16 MB / 2,000 bytes per row = 8,000 rows per partition: 2 shards of 4,000 events each.
    monkeypatch.setattr(duckdb_engine, "SORT_BYTES_PER_ROW", 2_000 if partitioned else 150)
    passes = []
    pass_one = sequences.pass_one
    monkeypatch.setattr(sequences, "pass_one", lambda *a: passes.append(1) or pass_one(*a))
    manifest = shard(inputs, tmp_path / name, memory_limit="16MB", events_per_shard=4_000, **kwargs)
    assert (len(passes) > 1) == partitioned
    return manifest


def test_partitioned_sort_writes_the_same_generations_as_one_sort(tmp_path, synth_log, monkeypatch):
    events, items = synth_log
    one = build(tmp_path, "one", [events], False, monkeypatch, items=str(items))
    parts = build(tmp_path, "parts", [events], True, monkeypatch, items=str(items))
    assert len(one["generations"][0]["shards"]) == 8
    assert not (tmp_path / "parts" / ".g0001.tmp").exists()
    assert comparable(one) == comparable(parts)
    assert tree(tmp_path / "one" / "g0001") == tree(tmp_path / "parts" / "g0001")
    rows = [{"user_id": f"u{k}", "item_id": f"i{k % 7}", "timestamp": 1_700_000_000 + k} for k in range(0, 600, 3)]
    rows.append(rows[0])  # a duplicate, dropped the same way
    new = write_lines(tmp_path / "new.jsonl", [json.dumps(r) for r in rows])
    one = build(tmp_path, "one", [new], False, monkeypatch, append=True)
    parts = build(tmp_path, "parts", [new], True, monkeypatch, append=True)
    assert one["generations"][1]["counts"]["duplicates"] == 1
    assert comparable(one) == comparable(parts)
    assert tree(tmp_path / "one" / "g0002") == tree(tmp_path / "parts" / "g0002")


def test_memory_limit_must_be_a_size(tmp_path, synth_log):
    with pytest.raises(DataError, match="expected a size such as 3GB"):
        shard([synth_log[0]], tmp_path / "out", memory_limit="lots")


def test_memory_sizes_read_like_duckdb():
    assert duckdb_engine.memory_bytes("3GB") == 3_000_000_000
    assert duckdb_engine.memory_bytes("512MiB") == 512 * 2**20
    assert duckdb_engine.memory_bytes("1.5 gb") == 1_500_000_000


def test_input_too_large_for_the_free_disk_stops_before_any_work(tmp_path, synth_log, monkeypatch):
    from data_sharding import staging

    monkeypatch.setattr(staging, "DISK_BYTES_PER_EVENT", 10**12)
    with pytest.raises(DataError, match=r"not enough free disk for about [\d,]+ events: .* GB are free"):
        shard([synth_log[0]], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_event_estimates_read_parquet_footers_and_err_towards_more_for_text(tmp_path, synth_log):
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    from data_sharding.staging import estimate_events

    table = pacsv.read_csv(synth_log[0])
    pq.write_table(table, tmp_path / "e.parquet")
    assert estimate_events([str(tmp_path / "e.parquet")]) == table.num_rows
    assert estimate_events([str(synth_log[0])]) >= table.num_rows
