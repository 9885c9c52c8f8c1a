"""Real public datasets from ../shared/data (never committed); skipped when the folder is absent."""

from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import shard
from test_ingest import all_events

from data_sharding.items_file import ItemsConfig
from data_sharding.shards import SPLIT_TEST

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPORTS = DATA / "amazon-sports" / "interactions.csv"
ML1M = DATA / "ml-1m" / "ratings_users_0001-2999.dat"

pytestmark = pytest.mark.realdata


@pytest.mark.skipif(not SPORTS.exists(), reason="../shared/data/amazon-sports is absent")
def test_amazon_sports_sequences_follow_the_published_order(tmp_path):
    manifest = shard([SPORTS], tmp_path / "sports", items=str(SPORTS.with_name("items.csv")))
    assert manifest["totals"]["events"] == 296_337
    assert manifest["totals"]["users"] == 35_598
    assert manifest["vocab"]["num_items"] - manifest["vocab"]["num_reserved_items"] == 18_357
    # The file is grouped by user in S3-Rec order; ties in time keep file order.
    table = pacsv.read_csv(SPORTS, convert_options=pacsv.ConvertOptions(column_types={"item_id": "string"}))
    expected: dict[str, list[str]] = {}
    for user, item in zip(table["user_id"].to_pylist(), table["item_id"].to_pylist(), strict=True):
        expected.setdefault(user, []).append(item)
    items = pq.read_table(tmp_path / "sports" / manifest["vocab"]["files"]["items"])["item"].to_pylist()
    users = pq.read_table(tmp_path / "sports" / manifest["vocab"]["files"]["users"])["user"].to_pylist()
    events = all_events(tmp_path / "sports")
    assert len(events) == len(expected)
    for uidx, seq in events.items():
        assert [items[i] for i in seq["item"]] == expected[users[uidx]]
        assert seq["split"][-1] == SPLIT_TEST


@pytest.mark.skipif(not ML1M.exists(), reason="../shared/data/ml-1m is absent")
def test_movielens_users_1_to_2999(tmp_path):
    movies = ML1M.with_name("movies.dat")
    manifest = shard(
        [ML1M], tmp_path / "ml", format="movielens", items=str(movies), items_options=ItemsConfig(format="movielens")
    )
    assert manifest["totals"]["events"] == 487_650
    assert manifest["totals"]["users"] == 2_999
    items = pq.read_table(tmp_path / "ml" / manifest["vocab"]["files"]["items"]).to_pylist()
    assert all(row["title"] for row in items[3:])
    assert items[3]["count"] >= items[4]["count"]
