"""Public layouts as they come: Amazon review JSON, MovieLens 100K files without headers, Yelp ids,
and Hugging Face `datasets` folders (save_to_disk, Hub-style Parquet) read offline."""

import json

import datasets
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_lines
from test_ingest import all_events

from data_sharding.errors import DataError
from data_sharding.shards import load_manifest
from launch.cli import main

T0 = 1_600_000_000


def items_table(out) -> dict[str, dict]:
    manifest = load_manifest(out)
    rows = pq.read_table(out / manifest["vocab"]["files"]["items"]).to_pylist()
    return {row["item"]: row for row in rows if row["title"] is not None}


def bgpt_shard(*args) -> int:
    return main(["shard", *map(str, args)])


def test_amazon_review_json_with_metadata_json(tmp_path):
    reviews = [
        {"reviewerID": f"A{u}", "asin": f"B00{(u + k) % 5}", "overall": 1.0 + k, "unixReviewTime": T0 + 86400 * k}
        for u in range(4)
        for k in range(3)
    ]
    meta = [
        {"asin": f"B00{i}", "title": f"Ball {i}", "categories": [["Sports", "Balls"]], "brand": "Acme", "price": 9.5}
        for i in range(5)
    ]
    events = write_lines(tmp_path / "Sports_5.json", [json.dumps(r) for r in reviews])
    items = write_lines(tmp_path / "meta_Sports.json", [json.dumps(m) for m in meta])
    assert bgpt_shard("--input", events, "--items", items, "--out", tmp_path / "out") == 0
    seqs = all_events(tmp_path / "out")
    assert sum(len(e) for e in seqs.values()) == 12
    assert sorted(e["value"].tolist() for e in seqs.values())[0] == [1.0, 2.0, 3.0]
    by_asin = items_table(tmp_path / "out")
    assert by_asin["B003"]["title"] == "Ball 3"
    assert 'categories=[["Sports","Balls"]]' in by_asin["B003"]["attributes"]
    assert "brand=Acme" in by_asin["B003"]["attributes"]


def test_movielens_100k_files_without_headers(tmp_path, capsys):
    rows = [f"{u}\t{10 + (u + k) % 4}\t{1 + k}\t{881250949 + 60 * k}" for u in range(1, 5) for k in range(3)]
    udata = write_lines(tmp_path / "u.data", rows)
    genres = ["unknown", "Action", "Comedy"]
    uitem = tmp_path / "u.item"
    uitem.write_bytes(
        "\n".join(f"{i}|Mis\xe9rables {i} (1995)|01-Jan-1995||http://x/{i}|0|{i % 2}|1" for i in range(10, 14)).encode(
            "latin-1"
        )
        + b"\n"
    )
    out = tmp_path / "out"
    assert bgpt_shard("--input", udata, "--out", out) == 2  # .data without --format: says how to name it
    assert "pass --format" in capsys.readouterr().err
    assert bgpt_shard("--input", udata, "--format", "tsv", "--out", out) == 2
    assert "needs --columns" in capsys.readouterr().err  # the first data row is not a header
    columns = "user_id,item_id,rating,timestamp"
    item_columns = ",".join(["movie_id", "title", "release_date", "video_release_date", "imdb_url", *genres])
    code = bgpt_shard(
        *("--input", udata, "--format", "tsv", "--columns", columns, "--out", out),
        *("--items", uitem, "--items-format", "csv", "--items-delimiter", "|", "--items-columns", item_columns),
        *("--items-encoding", "latin-1", "--items-attribute-cols", ",".join(["release_date", *genres])),
    )
    assert code == 0, capsys.readouterr().err
    seqs = all_events(out)
    assert sum(len(e) for e in seqs.values()) == 12  # no header row swallowed
    assert {e["ts"][0] for e in seqs.values()} == {881250949 * 1000}
    meta = items_table(out)
    assert meta["11"]["title"] == "Mis\xe9rables 11 (1995)"
    assert meta["11"]["attributes"] == "release_date=01-Jan-1995; unknown=0; Action=1; Comedy=1"


def test_yelp_business_ids_and_an_items_file_that_names_its_id_differently(tmp_path, capsys):
    reviews = [
        {"review_id": f"r{u}{k}", "user_id": f"u{u}", "business_id": f"b{(u + k) % 3}", "stars": 4,
         "date": f"2016-03-0{k + 1} 00:44:42"}
        for u in range(3) for k in range(3)
    ]  # fmt: skip
    business = [
        {"business_id": f"b{i}", "name": f"Cafe {i}", "categories": "Food, Coffee", "attributes": {"WiFi": "free"}}
        for i in range(3)
    ]
    events = write_lines(tmp_path / "review.json", [json.dumps(r) for r in reviews])
    items = write_lines(tmp_path / "business.json", [json.dumps(b) for b in business])
    assert bgpt_shard("--input", events, "--items", items, "--out", tmp_path / "yelp") == 0
    meta = items_table(tmp_path / "yelp")
    assert meta["b1"]["title"] == "Cafe 1"
    assert meta["b1"]["attributes"] == 'categories=Food, Coffee; attributes={"WiFi":"free"}'
    # Events say item_id, the items file a name no guess knows (and a shop_id that is no attribute).
    csv_events = write_lines(tmp_path / "e.csv", ["user_id,item_id,ts"] + [f"u{u},b{u},{T0 + u}" for u in range(3)])
    odd = write_lines(tmp_path / "biz.csv", ["place_ref,label,shop_id"] + [f"b{i},Shop {i},s{i}" for i in range(3)])
    assert bgpt_shard("--input", csv_events, "--items", odd, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert "no item id column in the items file" in err and "Pass --items-id-col NAME" in err
    assert not (tmp_path / "x").exists()
    code = bgpt_shard(
        *("--input", csv_events, "--items", odd, "--out", tmp_path / "x"),
        *("--items-id-col", "place_ref", "--items-title-col", "label"),
    )
    assert code == 0, capsys.readouterr().err
    assert items_table(tmp_path / "x")["b2"] == {**items_table(tmp_path / "x")["b2"], "title": "Shop 2"}
    assert items_table(tmp_path / "x")["b2"]["attributes"] is None
    code = bgpt_shard(*("--input", csv_events, "--items", odd, "--out", tmp_path / "y", "--items-id-col", "biz"))
    assert code == 2
    assert "--items-id-col 'biz' is not a column of the items file" in capsys.readouterr().err


def _events_table(n_users: int = 5, per_user: int = 4) -> pa.Table:
    rows = [(u, f"i{(u * 3 + k) % 7}", T0 + 60 * k) for u in range(n_users) for k in range(per_user)]
    user, item, ts = zip(*rows, strict=True)
    return pa.table({"user_id": list(user), "item_id": list(item), "timestamp": list(ts)})


def _same_events(a, b) -> None:
    ea, eb = all_events(a), all_events(b)
    assert ea.keys() == eb.keys()
    for uidx in ea:
        for name in ea[uidx].dtype.names:
            np.testing.assert_array_equal(ea[uidx][name], eb[uidx][name])


def test_datasets_save_to_disk_folders_read_like_the_same_rows_in_csv(tmp_path):
    table = _events_table()
    csv_path = tmp_path / "events.csv"
    table.to_pandas().to_csv(csv_path, index=False)
    assert bgpt_shard("--input", csv_path, "--out", tmp_path / "csv") == 0
    ds = datasets.Dataset(table)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)  # several .arrow files
    assert len(list((tmp_path / "saved").glob("*.arrow"))) > 1
    assert bgpt_shard("--input", tmp_path / "saved", "--out", tmp_path / "hf") == 0
    _same_events(tmp_path / "csv", tmp_path / "hf")
    # A DatasetDict: every split's events (the project makes its own split).
    half = table.num_rows // 2
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset(table.slice(0, half)), "test": datasets.Dataset(table.slice(half))}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert bgpt_shard("--input", tmp_path / "dict", "--out", tmp_path / "hfdict") == 0
    _same_events(tmp_path / "csv", tmp_path / "hfdict")
    inputs = load_manifest(tmp_path / "hfdict")["generations"][0]["sources"]
    assert [p["path"].split("/")[-2] for p in inputs] == ["train", "test"]


def test_hub_style_parquet_layout_local_and_url(tmp_path):
    table = _events_table(n_users=6)
    hub = tmp_path / "hub"
    (hub / "data").mkdir(parents=True)
    (hub / "README.md").write_text("---\nconfigs: ...\n---\n")
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), hub / "data" / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(half), hub / "data" / "train-00001-of-00002.parquet")
    (hub / ".cache").mkdir()
    pq.write_table(table.slice(0, 1), hub / ".cache" / "stale.parquet")  # hidden: not an input
    pq.write_table(table, tmp_path / "all.parquet")
    assert bgpt_shard("--input", tmp_path / "all.parquet", "--out", tmp_path / "one") == 0
    assert bgpt_shard("--input", hub, "--out", tmp_path / "local") == 0
    _same_events(tmp_path / "one", tmp_path / "local")
    fs = fsspec.filesystem("memory")
    for part in sorted((hub / "data").glob("*.parquet")):
        fs.pipe(f"/hubtest/default/train/{part.name}", part.read_bytes())
    assert bgpt_shard("--input", "memory://hubtest", "--out", tmp_path / "url") == 0
    _same_events(tmp_path / "one", tmp_path / "url")
    assert bgpt_shard("--input", "memory://hubtest/default/train/*.parquet", "--out", tmp_path / "glob") == 0
    _same_events(tmp_path / "one", tmp_path / "glob")


def test_bad_rows_in_an_arrow_file_are_quarantined_with_their_row_numbers(tmp_path):
    table = _events_table().to_pydict()
    table["timestamp"] = [str(t) for t in table["timestamp"]]
    table["timestamp"][6] = "not a time"
    datasets.Dataset.from_dict(table).save_to_disk(str(tmp_path / "saved"))
    assert bgpt_shard("--input", tmp_path / "saved", "--out", tmp_path / "out", "--max-bad-fraction", "0.1") == 0
    rejected = [json.loads(line) for line in (tmp_path / "out" / "g0001" / "quarantine.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [(7, "bad_timestamp")]
    assert rejected[0]["file"].endswith(".arrow")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"columns": ["a", "a"]}, "distinct"),
        ({"format": "parquet", "columns": ["a"]}, "apply to delimited files"),
        ({"delimiter": "::"}, "one character"),
        ({"encoding": "cp1252"}, "unknown --items-encoding"),
    ],
)
def test_layout_options_that_cannot_work_are_named(options, message):
    from data_sharding.items_file import ItemsConfig

    with pytest.raises(DataError, match=message):
        ItemsConfig(**options)
