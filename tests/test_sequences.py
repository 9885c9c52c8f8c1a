"""Per-user sequences: time order with exact int64 times, input order on ties, de-duplication and splits."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import shard, write_lines
from test_ingest import all_events

from data_sharding import sequences
from data_sharding.errors import DataError
from data_sharding.sequences import FILE_SHIFT, GEN_SHIFT, STREAM_DTYPE, SplitConfig
from data_sharding.shards import SPLIT_TEST, SPLIT_TRAIN, SPLIT_VALID

T, V, X = SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST


def item_names(out, manifest):
    table = pq.read_table(out / manifest["vocab"]["files"]["items"])
    return dict(zip(table["id"].to_pylist(), table["item"].to_pylist(), strict=True))


def sequence_of(out, manifest):
    (events,) = all_events(out).values()
    names = item_names(out, manifest)
    return [names[i] for i in events["item"].tolist()], events["ts"]


def test_events_are_ordered_by_time_to_the_millisecond_with_exact_int64_times(tmp_path):
    rows = [
        "u1,c,1600000000003",
        "u1,late,4102444799999",  # 2099-12-31T23:59:59.999Z: the last millisecond accepted
        "u1,a,1600000000001",
        "u1,b,1600000000002",
    ]
    out = tmp_path / "out"
    manifest = shard([write_lines(tmp_path / "e.csv", ["user,item,ts", *rows])], out)
    items, ts = sequence_of(out, manifest)
    assert items == ["a", "b", "c", "late"]
    assert ts.dtype == np.int64
    assert ts.tolist() == [1600000000001, 1600000000002, 1600000000003, 4102444799999]


def test_events_at_the_same_time_keep_input_order_across_files_in_the_order_given(tmp_path):
    first = write_lines(tmp_path / "first.csv", ["user,item,ts", "u1,x,1600000000", "u1,y,1600000000"])
    second = write_lines(tmp_path / "second.csv", ["user,item,ts", "u1,w,1600000000", "u1,v,1599999999"])
    manifest = shard([first, second], tmp_path / "a")
    assert sequence_of(tmp_path / "a", manifest)[0] == ["v", "x", "y", "w"]
    manifest = shard([second, first], tmp_path / "b")
    assert sequence_of(tmp_path / "b", manifest)[0] == ["v", "w", "x", "y"]


class Progress:
    def __init__(self):
        self.n = 0

    def update(self, n):
        self.n += n


BIG = 2**62 + 1  # not representable as a float64: only an int64 path keeps it


def stream_batch(rows):
    """A sorted-stream Arrow batch (the pipeline's SQL output) of (shard, uidx, ts, ord, item, type, value) rows."""
    names = ["shard", "uidx", "ts", "ord", "item", "type", "value"]
    types = [pa.int32(), pa.int32(), pa.int64(), pa.int64(), pa.int32(), pa.int16(), pa.float32()]
    columns = [pa.array([r[i] for r in rows], t) for i, t in enumerate(types)]
    return pa.RecordBatch.from_arrays(columns, names=names)


def gen(g, record, file=0):
    return g << GEN_SHIFT | file << FILE_SHIFT | record


STREAM = [
    # user 5, shard 0: one event from generation 1 (history), then generation 2's events
    (0, 5, BIG, gen(1, 0), 3, 1, 1.0),
    (0, 5, BIG + 1, gen(2, 0), 4, 1, 1.0),
    # -- batch boundary inside user 5 --
    (0, 5, BIG + 1, gen(2, 1), 4, 1, 1.0),  # duplicate of the row before: dropped
    (0, 5, BIG + 1, gen(2, 2), 4, 2, 1.0),  # another type: kept
    (0, 7, BIG + 2, gen(2, 3), 5, 1, None),
    (0, 7, BIG + 2, gen(2, 4), 5, 1, None),  # duplicate (no value both times): dropped
    (2, 1, 10, gen(2, 0, file=1), 3, 1, 2.0),
]


def test_batches_never_split_a_user_so_duplicates_across_a_batch_boundary_are_found():
    batches = [stream_batch(STREAM[:2]), stream_batch(STREAM[2:])]
    reader = pa.RecordBatchReader.from_batches(batches[0].schema, batches)
    out = [(s.tolist(), rows["uidx"].tolist()) for s, rows in sequences.sorted_user_batches(reader)]
    assert out == [([0] * 6, [5, 5, 5, 5, 7, 7]), ([2], [1])]


def test_pass_one_drops_duplicates_counts_new_events_and_parks_each_shards_rows_in_order(tmp_path):
    batches = [stream_batch(STREAM[:2]), stream_batch(STREAM[2:])]
    reader = pa.RecordBatchReader.from_batches(batches[0].schema, batches)
    progress = Progress()
    result = sequences.pass_one(reader, tmp_path, 2, 6, 3, progress)
    assert progress.n == 7
    assert result.duplicates == 2
    # New events only (generation 2): items 4 (twice), 5 and 3 (user 1); the history event is not counted.
    assert result.item_counts.tolist() == [0, 0, 0, 1, 2, 1]
    assert result.type_counts.tolist() == [0, 3, 1]
    assert result.shard_files == {0: tmp_path / "sorted-000000.npy", 2: tmp_path / "sorted-000002.npy"}
    zero = np.load(result.shard_files[0])
    assert zero.dtype == STREAM_DTYPE
    assert zero["uidx"].tolist() == [5, 5, 5, 7]
    assert zero["ts"].tolist() == [BIG, BIG + 1, BIG + 1, BIG + 2]
    assert zero["ord"].tolist() == [gen(1, 0), gen(2, 0), gen(2, 2), gen(2, 3)]
    assert zero["type"].tolist() == [1, 1, 2, 1]
    assert np.isnan(zero["value"][3])
    two = np.load(result.shard_files[2])
    assert two["ts"].tolist() == [10] and two["ord"].tolist() == [gen(2, 0, file=1)]


def test_user_bounds_are_the_runs_of_each_user():
    starts, lengths = sequences.user_bounds(np.array([4, 4, 7, 7, 7, 2]))
    assert starts.tolist() == [0, 2, 5] and lengths.tolist() == [2, 3, 1]
    starts, lengths = sequences.user_bounds(np.array([], np.int32))
    assert len(starts) == len(lengths) == 0


def test_leave_one_out_holds_out_the_last_two_events_of_users_with_at_least_three():
    uidx = np.array([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    flags = sequences.split_flags(uidx, np.arange(10), SplitConfig("loo"), None, None)
    assert flags.tolist() == [T, T, T, T, V, X, T, T, V, X]


def test_time_split_cutoffs_include_the_cutoff_instant():
    ts = np.array([100, 199, 200, 299, 300, 400])
    users = np.zeros(6, np.int32)
    split = SplitConfig("time", valid_start="2021-01-04", test_start="2021-01-06")
    assert sequences.split_flags(users, ts, split, 200, 300).tolist() == [T, T, V, V, X, X]
    split = SplitConfig("time", test_start="2021-01-06")
    assert sequences.split_flags(users, ts, split, None, 300).tolist() == [T, T, T, T, X, X]


def test_no_split_trains_on_every_event():
    uidx = np.array([0, 0, 0, 0])
    assert sequences.split_flags(uidx, np.arange(4), SplitConfig("none"), None, None).tolist() == [T] * 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"strategy": "random"}, "unknown --split 'random'; choose loo, time or none"),
        ({"strategy": "time"}, "--split time needs --test-start"),
        ({"strategy": "loo", "test_start": "2021-01-01"}, "--valid-start/--test-start only apply to --split time"),
        ({"strategy": "none", "valid_start": "2021-01-01"}, "--valid-start/--test-start only apply to --split time"),
    ],
)
def test_inconsistent_split_options_are_refused(kwargs, message):
    with pytest.raises(DataError, match=message):
        SplitConfig(**kwargs)


def test_final_records_map_ids_drop_rare_items_then_split_what_is_left():
    raw = [
        (0, 10, gen(1, 0), 3, 1, 1.0),
        (0, 20, gen(2, 0), 5, 1, 1.0),  # code 5: a rare new item
        (0, 30, gen(2, 1), 4, 2, np.nan),
        (0, 40, gen(2, 2), 6, 1, 0.5),
        (1, 15, gen(2, 3), 5, 1, 1.0),  # rare
        (1, 25, gen(2, 4), 6, 2, 1.0),
        (1, 35, gen(2, 5), 3, 1, 3.0),
    ]
    rows = np.array(raw, dtype=STREAM_DTYPE)
    records, kept, dropped = sequences.final_records(
        rows,
        item_map=np.array([0, 1, 2, 3, 5, -1, 4]),
        type_map=np.array([0, 2, 1]),
        generation=2,
        split=SplitConfig("loo"),
        valid_ms=None,
        test_ms=None,
    )
    assert dropped == 2
    assert kept["uidx"].tolist() == [0, 0, 0, 1, 1]
    assert records["item"].tolist() == [3, 5, 4, 4, 3]
    assert records["ts"].tolist() == [10, 30, 40, 25, 35]
    assert records["type"].tolist() == [2, 1, 2, 1, 2]
    assert records["new"].tolist() == [0, 1, 1, 1, 1]
    # User 1 has 2 events left, too few to hold any out; user 0's 3 are split.
    assert records["split"].tolist() == [T, V, X, T, T]
    np.testing.assert_array_equal(records["value"], np.array([1.0, np.nan, 0.5, 1.0, 3.0], np.float32))
