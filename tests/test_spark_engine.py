"""`bgpt shard --engine spark` on a real local[2] Spark: the same dataset as the DuckDB engine, byte for byte."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import comparable, shard, tree, write_lines

from data_sharding.errors import DataError
from data_sharding.shards import load_manifest, verify_dataset

pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java", allow_module_level=True)

pytestmark = pytest.mark.slow
SPARK = {"engine": "spark", "master": "local[2]"}
HEADER = "user_id,item_id,timestamp,event_type,rating"


def build_both(tmp_path, name, inputs, **kwargs):
    duck = shard(inputs, tmp_path / "duckdb" / name, **kwargs)
    spark = shard(inputs, tmp_path / "spark" / name, **kwargs, **SPARK)
    return duck, spark


def test_spark_and_duckdb_engines_write_identical_generations(tmp_path, synth_log):
    events, items = synth_log
    bad = write_lines(
        tmp_path / "bad.csv",
        [
            HEADER,
            "u1,i1,notatime,view,1",  # bad_timestamp
            "u2,,1600000000,view,1",  # missing_item
            "a,b",  # wrong_column_count (DuckDB's reader rejects it)
            "u3,007,1600000000,view,1",
            "u3,7,1600000000,view,1",  # same second, another id that reads as the same number
            "u3,7,1600000000,view,1",  # exact duplicate
            "u3,i9,1600000000,view,nan",  # bad_value
        ],
    )
    duck, spark = build_both(tmp_path, "data", [events, bad], items=str(items), events_per_shard=4_000)
    assert comparable(duck) == comparable(spark)
    assert duck["generations"][0]["counts"]["quarantined"] == 4
    assert duck["generations"][0]["counts"]["duplicates"] == 1
    assert tree(tmp_path / "duckdb" / "data" / "g0001") == tree(tmp_path / "spark" / "data" / "g0001")
    assert spark["generations"][0]["options"]["engine"] == "spark"

    # An append generation: touched and new users, new items, a duplicate of history, a bad row,
    # JSONL input this time.
    rows = [
        {"user_id": "u1", "item_id": "i3", "timestamp": 1_700_000_000, "event_type": "view"},
        {"user_id": "u1", "item_id": "brand_new", "timestamp": 1_700_000_100, "event_type": "wishlist"},
        {"user_id": "u_new", "item_id": "i3", "timestamp": 1_700_000_000, "event_type": "view"},
        {"user_id": "u_new", "item_id": "i4", "timestamp": 1_700_000_050, "event_type": "view"},
        {"user_id": "u_new", "item_id": "i4", "timestamp": 1_700_000_050, "event_type": "view"},
        {"user_id": "u2", "timestamp": 1_700_000_000, "event_type": "view"},
    ]
    new = write_lines(tmp_path / "new.jsonl", [json.dumps(r) for r in rows] + ["{not json"])
    # Through a file:// URL for Spark's tasks to fetch.
    duck = shard([new], tmp_path / "duckdb" / "data", append=True, events_per_shard=4_000, max_bad_fraction=0.5)
    spark = shard(
        [f"file://{new}"],
        tmp_path / "spark" / "data",
        append=True,
        events_per_shard=4_000,
        max_bad_fraction=0.5,
        **SPARK,
    )
    spark["generations"][1]["quarantine"]["by_file"] = {
        str(new): v for v in spark["generations"][1]["quarantine"]["by_file"].values()
    }
    assert comparable(duck) == comparable(spark)
    counts = duck["generations"][1]["counts"]
    assert counts["quarantined"] == 2 and counts["duplicates"] == 1 and counts["new_items"] == 1
    duck_tree, spark_tree = (tree(tmp_path / engine / "data" / "g0002") for engine in ("duckdb", "spark"))
    assert duck_tree.pop("quarantine.jsonl") != spark_tree.pop("quarantine.jsonl")  # names the file as given
    assert duck_tree == spark_tree
    quarantine = (tmp_path / "spark" / "data" / "g0002" / "quarantine.jsonl").read_text()
    assert (
        quarantine.replace(f"file://{new}", str(new))
        == (tmp_path / "duckdb" / "data" / "g0002" / "quarantine.jsonl").read_text()
    )
    spark_root = tmp_path / "spark" / "data"
    assert verify_dataset(spark_root, load_manifest(spark_root)) == []


def test_spark_engine_reports_an_unreadable_input_like_duckdb(tmp_path):
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError) as duck:
        shard([broken], tmp_path / "duck")
    with pytest.raises(DataError) as spark:
        shard([broken], tmp_path / "spark", **SPARK)
    assert str(spark.value) == str(duck.value)
    assert str(broken) in str(spark.value)
    # Nothing half-written: no manifest, no generation folder.
    assert not (tmp_path / "spark" / "manifest.json").exists()
    assert not list((tmp_path / "spark").glob("*g0001*"))


def test_spark_options_need_the_spark_engine(tmp_path):
    with pytest.raises(DataError, match="--master and --spark-conf only apply to --engine spark"):
        shard([tmp_path / "x.csv"], tmp_path / "out", master="local[2]")
    with pytest.raises(DataError, match="unknown --engine"):
        shard([tmp_path / "x.csv"], tmp_path / "out", engine="flink")


def test_cli_runs_the_spark_engine_with_settings(tmp_path, capsys):
    from launch.cli import main

    events = write_lines(
        tmp_path / "e.csv",
        [HEADER] + [f"u{u},i{(u * 7 + k) % 9},{1_600_000_000 + k},view,1" for u in range(20) for k in range(6)],
    )
    args = ["shard", "--input", str(events), "--out", str(tmp_path / "out"), "--engine", "spark"]
    assert main([*args, "--master", "local[2]", "--spark-conf", "spark.sql.shuffle.partitions=4"]) == 0
    options = load_manifest(tmp_path / "out")["generations"][0]["options"]
    assert options["engine"] == "spark" and options["spark_conf"] == {"spark.sql.shuffle.partitions": "4"}
    assert main([*args, "--spark-conf", "no-equals-sign"]) == 2
    assert "--spark-conf 'no-equals-sign': expected KEY=VALUE" in capsys.readouterr().err
