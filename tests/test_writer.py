"""The shard writer: one tar, index and events log per shard, from the parked rows of pass one."""

import hashlib
import io
import tarfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_sharding import shards, writer
from data_sharding.sequences import GEN_SHIFT, STREAM_DTYPE, PassOneResult, SplitConfig

NAN = np.nan
PARKED = {
    0: [
        # (uidx, ts, ord, item code, type code, value); user 3's first event is history from generation 1
        (3, 10, 1 << GEN_SHIFT | 0, 3, 1, 1.0),
        (3, 20, 2 << GEN_SHIFT | 0, 4, 1, 2.0),
        (3, 30, 2 << GEN_SHIFT | 1, 5, 1, NAN),  # code 5: a rare item, dropped
        (3, 40, 2 << GEN_SHIFT | 2, 3, 2, NAN),
        (8, 5, 2 << GEN_SHIFT | 3, 4, 1, 1.0),
    ],
    1: [
        (6, 7, 2 << GEN_SHIFT | 4, 3, 2, NAN),
        (6, 9, 2 << GEN_SHIFT | 5, 3, 2, NAN),
    ],
}
REMAP = {
    "item_map": np.array([0, 1, 2, 4, 3, -1]),  # codes 3 and 4 swap ids; code 5 is dropped
    "type_map": np.array([0, 1, 2]),
    "split": SplitConfig("loo"),
    "valid_ms": None,
    "test_ms": None,
}


def park(work, parked):
    work.mkdir(exist_ok=True)
    files = {}
    for shard, rows in parked.items():
        files[shard] = work / f"sorted-{shard:06d}.npy"
        np.save(files[shard], np.array(rows, dtype=STREAM_DTYPE))
    return PassOneResult(files, np.zeros(6, np.int64), np.zeros(3, np.int64), 0)


def write(tmp_path, name="g0002", parked=PARKED, num_shards=2, **kwargs):
    out_dir = tmp_path / name
    out_dir.mkdir()
    p1 = park(tmp_path / f"work-{name}", parked)
    return out_dir, p1, writer.write_shards(out_dir, p1, num_shards, 2, REMAP, **kwargs)


def test_every_shard_gets_a_tar_an_index_and_an_events_log(tmp_path):
    out_dir, p1, written = write(tmp_path)
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "events",
        "shard-000000.idx.npy",
        "shard-000000.tar",
        "shard-000001.idx.npy",
        "shard-000001.tar",
    ]
    assert sorted(p.name for p in (out_dir / "events").iterdir()) == ["shard-000000.parquet", "shard-000001.parquet"]
    assert not any(path.exists() for path in p1.shard_files.values())  # parked rows are consumed
    assert written["rare"] == 1
    assert written["new_events"] == 5
    assert written["uidx"].tolist() == [3, 8, 6]
    assert written["n_events"].tolist() == [3, 1, 2]


def test_the_manifest_entry_of_a_shard_matches_its_files(tmp_path):
    out_dir, _, written = write(tmp_path)
    first, last = written["shards"]
    tar = (out_dir / "shard-000000.tar").read_bytes()
    index = (out_dir / "shard-000000.idx.npy").read_bytes()
    assert first == shards.ShardInfo(
        name="g0002/shard-000000.tar",
        index="g0002/shard-000000.idx.npy",
        sha256=hashlib.sha256(tar).hexdigest(),
        index_sha256=hashlib.sha256(index).hexdigest(),
        bytes=len(tar),
        users=2,
        events=4,
        generation=2,
    )
    assert (last.name, last.index) == ("g0002/shard-000001.tar", "g0002/shard-000001.idx.npy")
    assert (last.users, last.events, last.generation) == (1, 2, 2)


def test_shards_hold_each_users_final_records_and_the_index_points_at_them(tmp_path):
    out_dir, _, _ = write(tmp_path)
    data = (out_dir / "shard-000000.tar").read_bytes()
    index = np.load(out_dir / "shard-000000.idx.npy")
    assert index.dtype == shards.INDEX_DTYPE
    assert index["uidx"].tolist() == [3, 8]
    assert index["n_events"].tolist() == [3, 1]
    assert index["n_train"].tolist() == [1, 1]
    assert index["n_valid"].tolist() == [1, 0]
    assert index["n_new"].tolist() == [2, 1]
    uidx, events = shards.read_sample(data, int(index["offset"][0]), "shard-000000.tar")
    assert uidx == 3
    assert events["item"].tolist() == [4, 3, 4]  # final ids, the rare item gone
    assert events["ts"].tolist() == [10, 20, 40]
    assert events["type"].tolist() == [1, 1, 2]
    assert events["split"].tolist() == [shards.SPLIT_TRAIN, shards.SPLIT_VALID, shards.SPLIT_TEST]
    assert events["new"].tolist() == [0, 1, 1]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["0000000003.seq.npy", "0000000008.seq.npy"]
        last = np.load(io.BytesIO(tar.extractfile(members[1]).read()))
    assert last.dtype == shards.SEQ_DTYPE and last["item"].tolist() == [3] and last["ts"].tolist() == [5]


def test_the_events_log_holds_only_new_events_with_final_ids(tmp_path):
    out_dir, _, _ = write(tmp_path)
    log = pq.read_table(out_dir / "events" / "shard-000000.parquet")
    assert log.schema == pa.schema(
        [
            ("uidx", pa.int32()),
            ("ts", pa.int64()),
            ("ord", pa.int64()),
            ("item", pa.int32()),
            ("type", pa.int16()),
            ("value", pa.float32()),
        ]
    )
    assert log["uidx"].to_pylist() == [3, 3, 8]
    assert log["ts"].to_pylist() == [20, 40, 5]
    assert log["ord"].to_pylist() == [2 << GEN_SHIFT | 0, 2 << GEN_SHIFT | 2, 2 << GEN_SHIFT | 3]
    assert log["item"].to_pylist() == [3, 4, 3]
    assert log["type"].to_pylist() == [1, 2, 1]
    assert np.isnan(log["value"].to_numpy()[1]) and log["value"].to_pylist()[::2] == [2.0, 1.0]


def test_the_same_rows_give_byte_identical_shards(tmp_path):
    _, _, first = write(tmp_path, "g0002")
    (tmp_path / "again").mkdir()
    _, _, again = write(tmp_path / "again", "g0002")
    assert again["shards"] == first["shards"]


def test_the_mapper_gets_one_job_per_shard_in_shard_order(tmp_path):
    jobs_seen = []

    def in_order(fn, jobs):
        jobs_seen.extend(jobs)
        return [fn(*job) for job in jobs]

    out_dir, p1, written = write(tmp_path, mapper=in_order)
    assert jobs_seen == [(0, p1.shard_files[0]), (1, p1.shard_files[1])]
    assert [s.name for s in written["shards"]] == ["g0002/shard-000000.tar", "g0002/shard-000001.tar"]


def test_a_shard_no_user_hashed_to_is_an_empty_tar_index_and_log(tmp_path):
    # Shard 1 of 3 gets no rows from pass one (few users, or --shard-multiple rounding up).
    out_dir, _, written = write(tmp_path, parked={0: PARKED[0], 2: PARKED[1]}, num_shards=3)
    empty = written["shards"][1]
    assert (empty.users, empty.events, empty.bytes) == (0, 0, 1024)  # just the end-of-archive blocks
    assert (out_dir / "shard-000001.tar").read_bytes() == bytes(1024)
    assert len(np.load(out_dir / "shard-000001.idx.npy")) == 0
    assert pq.read_table(out_dir / "events" / "shard-000001.parquet").num_rows == 0


def test_thread_map_returns_results_in_job_order_whatever_finishes_first():
    def slow_first(i):
        time.sleep(0.02 * (4 - i))
        return i * 10

    assert writer.thread_map(slow_first, [(i,) for i in range(4)]) == [0, 10, 20, 30]
