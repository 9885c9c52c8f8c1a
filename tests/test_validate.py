"""Bad rows go to the quarantine with file, line, raw text and reason; bad files fail clearly."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shard, write_lines

from data_sharding.errors import DataError

HEADER = "user_id,item_id,timestamp,event_type,rating"
GOOD = [f"u{i % 7},i{i % 11},{1_600_000_000 + i * 60},view,{1 + i % 5}" for i in range(400)]


def quarantine_rows(out):
    lines = (out / "g0001" / "quarantine.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines]


def test_each_kind_of_bad_row_is_quarantined_with_its_line_and_reason(tmp_path):
    bad = {
        3: "u1,,1600000000,view,3",  # missing item
        5: ",i1,1600000000,view,3",  # missing user
        7: "u1,i1,yesterday,view,3",  # unparsable time
        9: "u1,i1,-5,view,3",  # negative time
        11: "u1,i1,32503680000,view,3",  # year 3000 (seconds)
        13: "u1,i1,1600000000,view,great",  # non-numeric value
        15: "u1,i1,1600000000",  # wrong column count
        17: HEADER,  # header repeated mid-file
        19: "u1," + "x" * 1000 + ",1600000000,view,3",  # 1,000-character item id
    }
    rows = list(GOOD)
    for line in sorted(bad):
        rows.insert(line - 2, bad[line])  # line 1 is the header
    path = write_lines(tmp_path / "events.csv", [HEADER, *rows])
    manifest = shard([path], tmp_path / "out", max_bad_fraction=0.05)
    got = {r["line"]: r for r in quarantine_rows(tmp_path / "out")}
    assert set(got) == set(bad)
    reasons = {line: got[line]["reason"] for line in got}
    assert reasons == {
        3: "missing_item",
        5: "missing_user",
        7: "bad_timestamp",
        9: "timestamp_out_of_range",
        11: "timestamp_out_of_range",
        13: "bad_value",
        15: "wrong_column_count",
        17: "repeated_header",
        19: "item_id_too_long",
    }
    assert got[13]["raw"] == bad[13]
    assert got[15]["raw"] == bad[15]
    assert all(r["file"] == str(path) for r in got.values())
    counts = manifest["generations"][0]["quarantine"]
    assert counts["bad_rows"] == len(bad)
    assert counts["by_reason"]["timestamp_out_of_range"] == 2
    assert manifest["generations"][0]["counts"]["valid_rows"] == len(GOOD)


def test_ids_with_control_characters_are_quarantined_in_csv_and_parquet(tmp_path):
    bad = [("u1", "i\x005"), ("u\x01", "i1"), ("u2", "i\x7f"), ("u3", "a\x1bb")]
    rows = [{"user_id": u, "item_id": i, "timestamp": 1_600_000_000 + n} for n, (u, i) in enumerate(bad)]
    rows += [{"user_id": f"u{n % 7}", "item_id": f"i{n % 11}", "timestamp": 1_600_001_000 + n} for n in range(200)]
    parquet = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    csv = tmp_path / "events.csv"
    csv.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"{r['user_id']},{r['item_id']},{r['timestamp']}\n" for r in rows)
    )
    expected = ["item_id_control_character", "user_id_control_character", "item_id_control_character",
                "item_id_control_character"]  # fmt: skip
    for path in (parquet, csv):
        out = tmp_path / path.suffix[1:]
        manifest = shard([path], out, max_bad_fraction=0.05)
        got = quarantine_rows(out)
        assert [r["reason"] for r in got] == expected
        assert manifest["generations"][0]["counts"]["valid_rows"] == 200
        vocab = pq.read_table(out / "g0001" / "items.parquet").column(0).to_pylist()
        assert not any(ch in str(v) for v in vocab for ch in "\x00\x7f\x1b")


def test_undecodable_bytes_and_a_truncated_last_line_are_quarantined(tmp_path):
    data = (HEADER + "\n" + "\n".join(GOOD) + "\n").encode()
    data += b"u1,i\xff\xfe,1600000000,view,3\n" + b"u2,i2,16000"  # bad bytes, then a cut-off line
    path = write_lines(tmp_path / "events.csv", data)
    shard([path], tmp_path / "out", max_bad_fraction=0.05)
    rows = quarantine_rows(tmp_path / "out")
    assert [r["reason"] for r in rows] == ["undecodable_bytes", "wrong_column_count"]
    assert rows[0]["line"] == len(GOOD) + 2


def test_too_many_bad_rows_fail_naming_the_worst_file_and_reason_and_write_no_shards(tmp_path):
    good = write_lines(tmp_path / "good.csv", [HEADER, *GOOD])
    worse = write_lines(tmp_path / "worse.csv", [HEADER, *GOOD[:50], *["u1,i1,never,view,1"] * 20])
    with pytest.raises(DataError, match=r"worst file .*worse\.csv.*bad_timestamp"):
        shard([good, worse], tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out").glob("g0001"))
    assert len((tmp_path / "out" / "rejected-g0001.jsonl").read_text().splitlines()) == 20


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        (HEADER + "\n", "has no rows"),
        ("user_id,timestamp\nu1,1600000000\n", "no item column"),
        ("user_id;item_id;timestamp\nu1;i1;1600000000\n", "wrong delimiter"),
    ],
)
def test_unusable_files_give_a_one_line_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "events.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        shard([path], tmp_path / "out")
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # no empty --out folder left behind


def test_zero_valid_rows_is_an_error(tmp_path):
    path = write_lines(tmp_path / "events.csv", [HEADER, "u1,i1,never,view,1", "u2,i2,soon,view,1"])
    with pytest.raises(DataError, match="no valid rows"):
        shard([path], tmp_path / "out", max_bad_fraction=1.0)


def test_unreadable_and_missing_paths_are_named(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        shard([tmp_path / "missing.csv"], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no data files"):
        shard([tmp_path / "empty"], tmp_path / "out")
    locked = write_lines(tmp_path / "locked.csv", [HEADER, *GOOD])
    locked.chmod(0)
    if os.access(locked, os.R_OK):  # root reads anything
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(DataError, match="permission denied"):
        shard([locked], tmp_path / "out")


def test_typed_parquet_columns_are_checked_like_their_text(tmp_path):
    """Numeric time and value columns skip the text round trip; the reasons and events stay the same."""
    nan, inf = float("nan"), float("inf")
    times = [1_600_000_000.0 + k for k in range(200)] + [None, nan, 1e30, 1_600_000_300.0]
    values = [1.0 + k % 5 for k in range(200)] + [2.0, 2.0, 2.0, inf]
    users = [f"u{k % 9}" for k in range(len(times))]
    table = pa.table({"user_id": users, "item_id": [f"i{k % 13}" for k in range(len(times))]})
    pq.write_table(
        table.append_column("timestamp", pa.array(times)).append_column("rating", pa.array(values)),
        tmp_path / "typed.parquet",
    )
    text = ["user_id,item_id,timestamp,rating"] + [
        f"{u},{i},{'' if t is None else ('nan' if t != t else repr(t))},{'inf' if v == inf else v}"
        for u, i, t, v in zip(users, table["item_id"].to_pylist(), times, values, strict=True)
    ]
    write_lines(tmp_path / "text.csv", text)
    shard([tmp_path / "typed.parquet"], tmp_path / "pq", max_bad_fraction=0.1)
    shard([tmp_path / "text.csv"], tmp_path / "csv", max_bad_fraction=0.1)
    assert [(r["line"], r["reason"]) for r in quarantine_rows(tmp_path / "pq")] == [
        (201, "missing_timestamp"),
        (202, "bad_timestamp"),
        (203, "bad_timestamp"),
        (204, "bad_value"),
    ]
    assert [r["reason"] for r in quarantine_rows(tmp_path / "csv")] == [
        r["reason"] for r in quarantine_rows(tmp_path / "pq")
    ]
    read = [pq.read_table(out / "g0001" / "users.parquet").to_pylist() for out in (tmp_path / "pq", tmp_path / "csv")]
    assert read[0] == read[1]
