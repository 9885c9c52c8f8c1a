"""Batch prediction: top-K next items (and next event type / time / value when those heads exist)
for users, from the latest events in shards or in a raw events file, written to Parquet."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from data_sharding import shards, storage
from data_sharding.batching import collate_windows
from data_sharding.ingest import InputConfig, stage_file
from data_sharding.stream import iter_sequences
from trainer.config import CONFIG, load_run_config
from trainer.errors import ConfigError
from trainer.inference import InferenceModel


@dataclass
class History:
    """One user's latest events as model ids, oldest first."""

    user: str
    items: np.ndarray
    types: np.ndarray
    times: np.ndarray


def histories_from_data(data: Path, model: InferenceModel, users: list[str] | None = None) -> Iterator[History]:
    """Latest events of every user (or the named ones) in a sharded dataset, all generations merged.

    Items the model does not know (added by a later ``--append`` generation) are left out."""
    manifest = shards.load_manifest(data)
    table = storage.read_parquet(data, manifest["vocab"]["files"]["users"], columns=["uidx", "user"])
    names = dict(zip(table["uidx"].to_pylist(), table["user"].to_pylist(), strict=True))
    wanted = None
    if users is not None:
        index = {name: uidx for uidx, name in names.items()}
        unknown = [u for u in users if u not in index]
        if unknown:
            raise ConfigError(f"unknown users {unknown[:5]} (not in {data})")
        wanted = {index[u] for u in users}
    for uidx, events in iter_sequences(data):
        if wanted is not None and uidx not in wanted:
            continue
        events = events[events["item"] < model.num_items][-model.max_len :]
        if len(events):
            yield History(
                names[uidx], events["item"].astype(np.int64), events["type"].astype(np.int64), events["ts"].copy()
            )


def histories_from_events(path: Path, model: InferenceModel, fmt: str = "auto", log=print) -> Iterator[History]:
    """Histories from a raw events file (any format ``bgpt shard`` reads), ordered by time per user.

    Rows that fail validation and events of unknown items or types are skipped and counted."""
    con = duckdb.connect()
    src = stage_file(con, 0, str(path), InputConfig(paths=[str(path)], format=fmt))
    bad = con.execute(f"SELECT count(*) FROM {src.table} WHERE reason IS NOT NULL").fetchall()[0][0]
    con.register("vocab_items", pa.table({"item": model.items, "iid": np.arange(model.num_items)}))
    con.register("vocab_types", pa.table({"event_type": model.event_types, "tid": np.arange(len(model.event_types))}))
    rel = con.sql(
        f"SELECT e.user, v.iid, t.tid, e.ts FROM {src.table} e "
        "JOIN vocab_items v ON v.item = e.item AND v.iid >= 3 JOIN vocab_types t ON t.event_type = e.event_type "
        "WHERE e.reason IS NULL ORDER BY e.user, e.ts, e.rowid"
    ).to_arrow_table()
    total = con.execute(f"SELECT count(*) FROM {src.table} WHERE reason IS NULL").fetchall()[0][0]
    if bad or total - rel.num_rows:
        log(f"{path}: skipped {bad} invalid rows and {total - rel.num_rows} events of unknown items or types")
    users = rel["user"].to_numpy(zero_copy_only=False)
    cols = [rel[c].to_numpy() for c in ("iid", "tid", "ts")]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.array([], dtype=np.int64)
    ends = np.r_[starts[1:], len(users)]
    for start, end in zip(starts, ends, strict=True):
        start = max(start, end - model.max_len)
        yield History(str(users[start]), *(c[start:end].astype(np.int64) for c in cols))


def select_histories(
    model: InferenceModel,
    run: Path,
    data: str | Path | None = None,
    events: Path | None = None,
    fmt: str = "auto",
    users: list[str] | None = None,
) -> Iterator[History]:
    """The histories to predict from: a raw ``events`` file, else the sharded ``data`` (default:
    the run's own dataset; an export has none, so it needs one of the two); only ``users`` when given."""
    if events is not None:
        histories = histories_from_events(events, model, fmt)
        wanted = set(users) if users is not None else None
        return histories if wanted is None else (h for h in histories if h.user in wanted)
    if data is None:
        if not (run / CONFIG).exists():
            raise ConfigError(f"{run} is an export: pass --data DIR or --events FILE")
        data = load_run_config(run).data.path
    return histories_from_data(storage.as_root(data), model, users)


def _batch(histories: list[History]) -> tuple[torch.Tensor, ...]:
    """(items, types, times, mask) of the histories, padded like training windows."""
    windows = []
    for h in histories:
        w = np.zeros(len(h.items), dtype=shards.SEQ_DTYPE)
        w["item"], w["type"], w["ts"] = h.items, h.types, h.times
        windows.append(w)
    batch = collate_windows(list(range(len(windows))), windows)
    return batch["items"], batch["types"], batch["times"], batch["mask"]


def predict(
    model: InferenceModel, histories: list[History], k: int, exclude_seen: bool = False, at_ms: int | None = None
) -> list[dict[str, object]]:
    """One record per history: user, items, scores (best first) and the side predictions. ``at_ms``:
    when the predicted event happens (models with model.query_time or model.trend_prior; default:
    now)."""
    at = int(time.time() * 1000) if at_ms is None else at_ms
    hidden = model.encode(*_batch(histories), at=torch.full((len(histories),), at))
    exclude = [h.items.tolist() for h in histories] if exclude_seen else None
    context = model.context([h.items.tolist() for h in histories])
    gap = torch.tensor([at - int(h.times[-1]) for h in histories])
    top, scores = model.top_k(hidden, k, exclude, context, gap, torch.full((len(histories),), at))
    side = model.side_predictions(hidden)
    records = []
    for row, h in enumerate(histories):
        keep = np.isfinite(scores[row])  # fewer than k items left after exclusions
        record: dict[str, object] = {
            "user": h.user,
            "items": [model.items[i] for i in top[row][keep]],
            "scores": scores[row][keep].astype(np.float32).tolist(),
        }
        if "next_event_type" in side:
            record["next_event_type"] = model.event_types[int(side["next_event_type"][row])]
        for key in ("next_event_seconds", "next_value"):
            if key in side:
                record[key] = float(side[key][row])
        records.append(record)
    return records


def _chunks(histories: Iterator[History], size: int) -> Iterator[list[History]]:
    chunk: list[History] = []
    for history in histories:
        chunk.append(history)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def write_predictions(
    model: InferenceModel,
    histories: Iterator[History],
    out: Path,
    k: int,
    exclude_seen: bool = False,
    batch_size: int = 256,
    progress: bool = True,
    at_ms: int | None = None,
) -> dict[str, float]:
    """Predict for every history and write Parquet (written beside ``out`` and renamed at the end);
    ``at_ms``: when the predicted events happen (see :func:`predict`; one time for every user)."""
    at_ms = int(time.time() * 1000) if at_ms is None else at_ms
    tmp = out.with_name(f".{out.name}.tmp")
    writer = None
    users = 0
    started = time.perf_counter()
    bar = tqdm(desc="predict", unit="user", disable=not progress)
    try:
        for chunk in _chunks(histories, batch_size):
            table = pa.Table.from_pylist(predict(model, chunk, k, exclude_seen, at_ms))
            writer = writer or pq.ParquetWriter(tmp, table.schema)
            writer.write_table(table)
            users += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if writer is None:
        raise ConfigError("no user has a history the model can read: nothing to predict")
    tmp.rename(out)
    seconds = time.perf_counter() - started
    return {"users": users, "seconds": round(seconds, 3), "users_per_s": round(users / max(seconds, 1e-9), 1)}
