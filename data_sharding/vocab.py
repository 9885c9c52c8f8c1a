"""Stable item, event-type and user vocabularies, saved per generation beside the shards.

Item ids are dense integers. The first ``NUM_RESERVED_ITEMS`` ids are special tokens the model
needs (padding, unknown item for serving, mask for masked-item objectives); real items follow,
ordered by frequency (descending), then by id (numeric ids numerically). An ``--append``
generation never changes an existing id: new items get the next ids, ordered the same way
among themselves. Event types work alike with id 0 as padding. Users get dense indices too
(in id order, new users appended), used as sample keys.

Ids are assigned in two steps because duplicates are only found once events are sorted: SQL
gives every id a *provisional code* (known ids keep their final id; new ids are numbered in id
order), the sorted pass counts de-duplicated events per code, and :func:`finalize_codes` turns
those counts into final ids.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

RESERVED_ITEMS = ("[PAD]", "[UNK]", "[MASK]")
NUM_RESERVED_ITEMS = len(RESERVED_ITEMS)
PAD_ITEM, UNK_ITEM, MASK_ITEM = 0, 1, 2
RESERVED_TYPES = ("[PAD]",)
NUM_RESERVED_TYPES = len(RESERVED_TYPES)
# Order new ids numerically when they are numbers, else as strings.
ID_ORDER = "TRY_CAST({col} AS BIGINT) NULLS LAST, {col}"


@dataclass
class Vocab:
    """Item and event-type vocabularies of one generation (reserved entries included)."""

    generation: int
    items: pa.Table
    """Columns id, item, count, generation, title, attributes; row i has id i."""
    event_types: list[str]
    type_counts: list[int]
    version: str

    @property
    def num_items(self) -> int:
        """Size of the item id space, reserved ids included."""
        return self.items.num_rows

    @property
    def num_event_types(self) -> int:
        return len(self.event_types)


def vocab_version(generation: int, items: list[str], types: list[str]) -> str:
    digest = hashlib.sha256("\n".join(items).encode() + b"\0" + "\n".join(types).encode()).hexdigest()
    return f"g{generation:04d}-{digest[:12]}"


def load_vocab(gen_dir: Path) -> Vocab:
    """The vocabulary saved in a generation folder."""
    meta = json.loads((gen_dir / "vocab.json").read_text())
    items = pq.read_table(gen_dir / "items.parquet")
    return Vocab(meta["generation"], items, meta["event_types"], meta["type_counts"], meta["version"])


def create_code_tables(
    con: duckdb.DuckDBPyConnection,
    previous: Vocab | None,
    previous_users: Path | None,
    seen_items: str,
    seen_types: str,
    user_counts: str,
) -> tuple[int, int]:
    """Create item_codes, type_codes and user_codes from the ids one generation's events hold.

    ``seen_items`` / ``seen_types`` name relations of the distinct ``item`` / ``event_type`` values,
    ``user_counts`` one of ``(user, n)``: events per user. Either engine computes these (DuckDB
    in SQL, Spark in a distributed aggregation); the numbering below is the same for both.
    Returns (number of item codes, number of type codes). Known ids map to their final id.
    """
    known_items = previous.items.slice(NUM_RESERVED_ITEMS).select(["item", "id"]) if previous else None
    known_types = (
        pa.table({"name": previous.event_types[NUM_RESERVED_TYPES:]}).append_column(
            "id", pa.array(range(NUM_RESERVED_TYPES, previous.num_event_types), pa.int32())
        )
        if previous
        else None
    )
    n_items = _codes(
        con, "item_codes", "item", seen_items, known_items, previous.num_items if previous else NUM_RESERVED_ITEMS
    )
    n_types = _codes(
        con,
        "type_codes",
        "event_type",
        seen_types,
        known_types.rename_columns(["event_type", "id"]) if known_types else None,
        previous.num_event_types if previous else NUM_RESERVED_TYPES,
    )
    known_users = f"SELECT user, uidx FROM read_parquet('{previous_users}')" if previous_users else None
    con.execute(
        f"CREATE OR REPLACE TABLE user_codes AS "
        f"WITH seen AS (SELECT user, n FROM {user_counts}), "
        f"known AS ({known_users or 'SELECT NULL::VARCHAR AS user, NULL::INTEGER AS uidx WHERE false'}), "
        f"start AS (SELECT coalesce(max(uidx) + 1, 0) AS s FROM known) "
        f"SELECT seen.user, seen.n, coalesce(known.uidx, (SELECT s FROM start) + "
        f"row_number() OVER (PARTITION BY known.uidx IS NULL ORDER BY {ID_ORDER.format(col='seen.user')}) - 1)"
        f"::INTEGER AS uidx FROM seen LEFT JOIN known USING (user)"
    )
    return n_items, n_types


def _codes(
    con: duckdb.DuckDBPyConnection, table: str, col: str, seen: str, known: pa.Table | None, next_code: int
) -> int:
    if known is not None:
        con.register("known_codes", known)
    else:
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW known_codes AS SELECT NULL::VARCHAR AS {col}, NULL::INTEGER AS id WHERE false"
        )
    con.execute(
        f"CREATE OR REPLACE TABLE {table} AS "
        f"WITH seen AS (SELECT DISTINCT {col} FROM {seen}) "
        f"SELECT seen.{col} AS key, coalesce(k.id, {next_code} + row_number() OVER "
        f"(PARTITION BY k.id IS NULL ORDER BY {ID_ORDER.format(col='seen.' + col)}) - 1)::INTEGER AS code "
        f"FROM seen LEFT JOIN known_codes k USING ({col})"
    )
    if known is not None:
        con.unregister("known_codes")
    else:
        con.execute("DROP VIEW known_codes")
    # Every known id counts, not only those seen in the new events: the touched users' histories
    # (read back from earlier generations) hold any of them.
    return int(con.execute(f"SELECT greatest(coalesce(max(code) + 1, 0), {next_code}) FROM {table}").fetchall()[0][0])


def finalize_codes(counts: np.ndarray, num_known: int, min_count: int) -> np.ndarray:
    """Map provisional codes to final ids: known codes stay; new ones are ordered by count, then id.

    ``counts[c]`` is the de-duplicated number of new events with code ``c``. New codes with fewer
    than ``min_count`` events map to -1 (dropped).
    """
    mapping = np.arange(len(counts), dtype=np.int64)
    new_codes = np.arange(num_known, len(counts))
    kept = new_codes[counts[new_codes] >= min_count]
    # Provisional codes follow id order, so sorting by (-count, code) is "frequency, then id".
    order = kept[np.lexsort((kept, -counts[kept]))]
    mapping[num_known:] = -1
    mapping[order] = num_known + np.arange(len(order))
    return mapping


def build_vocab(
    con: duckdb.DuckDBPyConnection,
    generation: int,
    previous: Vocab | None,
    item_map: np.ndarray,
    item_counts: np.ndarray,
    type_map: np.ndarray,
    type_counts: np.ndarray,
    has_item_meta: bool,
) -> Vocab:
    """The new generation's vocabulary: previous entries (counts updated) plus the admitted new ids."""
    num_items = int(item_map.max()) + 1 if len(item_map) else NUM_RESERVED_ITEMS
    num_items = max(num_items, previous.num_items if previous else NUM_RESERVED_ITEMS)
    # Provisional code -> key; final id i holds the key of the code that maps to it.
    codes = con.sql("SELECT code, key FROM item_codes").to_arrow_table()
    keys = np.empty(len(item_map), dtype=object)
    keys[codes["code"].to_numpy()] = np.array(codes["key"].to_pylist(), dtype=object)
    names = np.empty(num_items, dtype=object)
    names[:NUM_RESERVED_ITEMS] = RESERVED_ITEMS
    counts = np.zeros(num_items, dtype=np.int64)
    added = np.zeros(num_items, dtype=np.int32)
    if previous is not None:
        names[: previous.num_items] = previous.items["item"].to_pylist()
        counts[: previous.num_items] = previous.items["count"].to_numpy()
        added[: previous.num_items] = previous.items["generation"].to_numpy()
    admitted = np.nonzero(item_map >= 0)[0]
    admitted = admitted[admitted >= NUM_RESERVED_ITEMS]
    final = item_map[admitted]
    is_new = final >= (previous.num_items if previous else NUM_RESERVED_ITEMS)
    names[final[is_new]] = keys[admitted[is_new]]
    added[final[is_new]] = generation
    np.add.at(counts, final, item_counts[admitted])

    items = pa.table(
        {
            "id": pa.array(np.arange(num_items, dtype=np.int32)),
            "item": pa.array(names.tolist(), pa.string()),
            "count": pa.array(counts),
            "generation": pa.array(added),
        }
    )
    items = _attach_text(con, items, previous, has_item_meta)

    type_names = list(RESERVED_TYPES) + (previous.event_types[NUM_RESERVED_TYPES:] if previous else [])
    tcounts = list(previous.type_counts) if previous else [0] * NUM_RESERVED_TYPES
    tcodes = dict(con.execute("SELECT code, key FROM type_codes").fetchall())
    for code in np.argsort(type_map, kind="stable"):
        tid = int(type_map[code])
        if tid < NUM_RESERVED_TYPES:
            continue
        if tid >= len(type_names):
            type_names.append(tcodes[int(code)])
            tcounts.append(0)
        tcounts[tid] += int(type_counts[code])
    version = vocab_version(generation, items["item"].to_pylist(), type_names)
    return Vocab(generation, items, type_names, tcounts, version)


def _attach_text(con: duckdb.DuckDBPyConnection, items: pa.Table, previous: Vocab | None, has_meta: bool) -> pa.Table:
    """Add title and attributes: an item keeps the text it had; new items take the items file's."""
    sources = []
    con.register("vocab_items", items)
    if previous is not None:
        con.register("prev_text", previous.items.select(["id", "title", "attributes"]))
        sources.append(("p", "LEFT JOIN prev_text p ON p.id = v.id"))
    if has_meta:
        sources.append(("m", "LEFT JOIN item_meta m ON m.item = v.item"))
    joins = " ".join(join for _, join in sources)

    def first(column: str) -> str:
        return (
            f"CAST(coalesce({', '.join(f'{alias}.{column}' for alias, _ in sources)}) AS VARCHAR)"
            if sources
            else "NULL::VARCHAR"
        )

    table = con.sql(
        f"SELECT v.*, {first('title')} AS title, {first('attributes')} AS attributes FROM vocab_items v {joins} ORDER BY v.id"
    ).to_arrow_table()
    con.unregister("vocab_items")
    if previous is not None:
        con.unregister("prev_text")
    return table


def manifest_entry(vocab: Vocab, gen_dir: str, files: dict[str, str]) -> dict:
    """The manifest's description of the vocabulary saved in ``gen_dir`` as ``files`` (name -> file)."""
    return {
        "version": vocab.version,
        "dir": gen_dir,
        "files": {k: f"{gen_dir}/{Path(v).name}" for k, v in files.items()},
        "num_items": vocab.num_items,
        "num_reserved_items": NUM_RESERVED_ITEMS,
        "num_event_types": vocab.num_event_types,
        "event_types": vocab.event_types,
    }


def save_vocab(gen_dir: Path, vocab: Vocab) -> dict[str, str]:
    """Write vocab.json and items.parquet into ``gen_dir``; return their file names."""
    pq.write_table(vocab.items, gen_dir / "items.parquet")
    meta = {
        "version": vocab.version,
        "generation": vocab.generation,
        "num_items": vocab.num_items,
        "reserved_items": list(RESERVED_ITEMS),
        "event_types": vocab.event_types,
        "type_counts": vocab.type_counts,
    }
    (gen_dir / "vocab.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"vocab": "vocab.json", "items": "items.parquet"}
