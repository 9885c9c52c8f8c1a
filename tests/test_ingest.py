"""Formats and timestamp encodings all arrive as the same events."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from conftest import shard, write_lines

from data_sharding.items_file import ItemsConfig
from data_sharding.stream import iter_sequences


def all_events(out) -> dict[int, np.ndarray]:
    """uidx -> events of every user (latest sequence), read back from the shards."""
    return dict(iter_sequences(out))


def test_seconds_milliseconds_and_iso_timestamps_agree(tmp_path):
    base = 1_600_000_000
    header = "user,item,ts"
    secs = write_lines(tmp_path / "s.csv", [header] + [f"u1,i{k},{base + k}" for k in range(3)])
    millis = write_lines(tmp_path / "ms.csv", [header] + [f"u1,i{k},{(base + k) * 1000}" for k in range(3)])
    iso = write_lines(
        tmp_path / "iso.csv",
        [header] + [f"u1,i{k},2020-09-13T12:26:{40 + k:02d}Z" for k in range(3)],
    )
    times = []
    for path in (secs, millis, iso):
        shard([path], tmp_path / path.stem)
        times.append(all_events(tmp_path / path.stem)[0]["ts"].tolist())
    assert times[0] == times[1] == times[2] == [(base + k) * 1000 for k in range(3)]


def test_timestamps_keep_millisecond_order_beyond_float32_precision(tmp_path):
    base = 1_700_000_000_000
    rows = ["user,item,ts"] + [f"u1,i{k},{base + k}" for k in (2, 0, 1)]
    shard([write_lines(tmp_path / "e.csv", rows)], tmp_path / "out", time_unit="ms")
    events = all_events(tmp_path / "out")[0]
    assert events["ts"].dtype == np.int64
    assert events["ts"].tolist() == [base, base + 1, base + 2]


def test_movielens_latin1_files_with_items(tmp_path):
    ratings = write_lines(
        tmp_path / "ratings.dat",
        [
            f"{u}::{m}::{r}::{978300760 + t}"
            for t, (u, m, r) in enumerate([(1, 10, 5), (1, 20, 3), (2, 10, 4), (1, 30, 1)])
        ],
    )
    movies = tmp_path / "movies.dat"
    movies.write_bytes("10::Am\xe9lie (2001)::Comedy|Romance\n20::Heat (1995)::Action\n".encode("latin-1"))
    manifest = shard(
        [ratings],
        tmp_path / "out",
        format="movielens",
        items=str(movies),
        items_options=ItemsConfig(format="movielens"),
    )
    items = pq.read_table(tmp_path / "out" / manifest["vocab"]["files"]["items"]).to_pylist()
    by_id = {row["item"]: row for row in items}
    assert by_id["10"]["title"] == "Amélie (2001)"
    assert by_id["10"]["attributes"] == "genres=Comedy|Romance"
    assert by_id["10"]["id"] == 3  # most frequent item gets the first non-reserved id
    events = all_events(tmp_path / "out")
    assert events[0]["value"].tolist() == [5.0, 3.0, 1.0]


def test_jsonl_parquet_and_tsv_inputs(tmp_path):
    rows = [{"user_id": "a", "item_id": f"x{k}", "timestamp": 1_600_000_000 + k, "rating": k} for k in range(4)]
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    parquet = tmp_path / "e.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    tsv = write_lines(
        tmp_path / "e.tsv",
        ["user_id\titem_id\ttimestamp\trating"] + [f"a\tx{k}\t{1_600_000_000 + k}\t{k}" for k in range(4)],
    )
    results = []
    for path in (jsonl, parquet, tsv):
        manifest = shard([path], tmp_path / path.suffix[1:], max_bad_fraction=0.5)
        results.append(all_events(tmp_path / path.suffix[1:])[0][["item", "ts", "value"]].tolist())
        bad = manifest["generations"][0]["quarantine"]["by_reason"]
        assert bad == ({"malformed_json": 1} if path == jsonl else {})
    assert results[0] == results[1] == results[2]


def test_gzip_compressed_csv_reads_like_plain_csv(tmp_path):
    import gzip

    rows = "user,item,ts\nu1,a,1600000000\nu1,b,1600000100\n"
    (tmp_path / "e.csv").write_text(rows)
    with gzip.open(tmp_path / "e.csv.gz", "wt") as f:
        f.write(rows)
    shard([tmp_path / "e.csv"], tmp_path / "plain")
    shard([tmp_path / "e.csv.gz"], tmp_path / "gz")
    plain, gz = all_events(tmp_path / "plain")[0], all_events(tmp_path / "gz")[0]
    assert plain[["item", "ts", "type", "split"]].tolist() == gz[["item", "ts", "type", "split"]].tolist()
