"""How one input file is laid out (format, column names, delimiter, encoding) and the DuckDB scan
that reads it: shared by the events files (:mod:`data_sharding.ingest`) and the items file
(:mod:`data_sharding.items_file`).

Formats: CSV, TSV, Parquet, JSONL (one JSON object per line, e.g. Amazon reviews), MovieLens
``::`` files, and Arrow IPC streams (the ``.arrow`` files ``datasets.Dataset.save_to_disk``
writes). A delimited file without a header row is read with ``columns`` naming its columns
(MovieLens 100K ``u.data``: ``--format tsv --columns user_id,item_id,rating,timestamp``).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from dataclasses import dataclass, field

import duckdb

from data_sharding import storage
from data_sharding.errors import DataError

FORMATS = ("auto", "csv", "tsv", "parquet", "jsonl", "movielens", "arrow")
ENCODINGS = ("utf-8", "latin-1", "utf-16")
"""What DuckDB's CSV reader decodes without an extension (none is downloaded here)."""
MOVIELENS_EVENT_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
MOVIELENS_ITEM_COLUMNS = ("item_id", "title", "genres")


@dataclass
class Layout:
    """One file as it will be scanned."""

    path: str
    format: str
    header: list[str]
    """Column names (JSONL: the keys of the first object)."""
    has_header: bool
    """Whether the file's first line holds the names (delimited formats)."""
    delimiter: str = ","
    encoding: str = "utf-8"
    types: dict[str, str] = field(default_factory=dict)
    """DuckDB type of each column of a typed format (Parquet, Arrow); empty for text formats."""


def check_options(fmt: str, columns: list[str] | None, delimiter: str | None, encoding: str, flag: str = "") -> None:
    """One-line errors for format/layout options that cannot work together (``flag``: the option
    prefix in messages, "" for the events files and "items-" for the items file)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown --{flag}format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if encoding not in ENCODINGS:
        raise DataError(f"unknown --{flag}encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    if columns is not None and (not columns or len(set(columns)) != len(columns) or not all(columns)):
        raise DataError(f"--{flag}columns needs distinct, non-empty names; got {columns}")
    if delimiter is not None and len(delimiter) != 1:
        raise DataError(f"--{flag}delimiter must be one character; got {delimiter!r}")
    if (columns or delimiter) and fmt in ("parquet", "jsonl", "arrow", "movielens"):
        raise DataError(f"--{flag}columns and --{flag}delimiter apply to delimited files (csv, tsv), not {fmt}")


def detect_format(path: str) -> str:
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if name.endswith(".dat"):
        return "movielens"
    if name.endswith((".csv", ".txt")):
        return "csv"
    if name.endswith(".arrow"):
        return "arrow"
    raise DataError(f"{path}: cannot tell the format from the extension; pass --format (csv, tsv, ...)")


def check_readable(given: str) -> None:
    """Fail with a one-line error for a missing, unreadable or empty input file (path or URL)."""
    path = storage.local_file(given)
    if path is None:
        storage.check_remote_input(given)
        return
    if not os.path.exists(path):
        raise DataError(f"{given}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{given}: is a directory, expected a file")
    if not os.access(path, os.R_OK):
        raise DataError(f"{given}: permission denied")
    if os.path.getsize(path) == 0:
        raise DataError(f"{given}: file is empty")


def _open_text(path: str, encoding: str) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")


def read_header(path: str, fmt: str, delimiter: str, encoding: str = "utf-8") -> list[str]:
    """Column names of a delimited or JSONL file, read from its first line."""
    with _open_text(path, encoding) as f:
        first = f.readline().rstrip("\r\n")
    if not first.strip():
        raise DataError(
            f"{path}: the first line is empty; expected a header (or pass --columns for a file without one)"
        )
    if fmt == "jsonl":
        try:
            record = json.loads(first)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:1: not a JSON object ({e.msg}); is this really JSONL?") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:1: expected a JSON object per line")
        return list(record)
    return next(csv.reader([first], delimiter=delimiter))


def arrow_stream(path: str):
    """A reader over an Arrow IPC stream file (memory-mapped: batches are read as scanned)."""
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: not a readable Arrow IPC stream ({e})") from None


def file_layout(
    con: duckdb.DuckDBPyConnection,
    path: str,
    fmt: str,
    columns: list[str] | None = None,
    delimiter: str | None = None,
    encoding: str = "utf-8",
    movielens_columns: tuple[str, ...] = MOVIELENS_EVENT_COLUMNS,
) -> Layout:
    """Read what is needed to scan ``path``: its format (``auto``: from the extension) and names."""
    check_readable(path)
    fmt = fmt if fmt != "auto" else detect_format(path)
    if fmt == "movielens":
        return Layout(path, fmt, list(movielens_columns), False, "::", "latin-1")
    if fmt == "parquet":
        try:
            described = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()
        except duckdb.Error as e:
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
        return Layout(path, fmt, [row[0] for row in described], False, types={row[0]: row[1] for row in described})
    if fmt == "arrow":
        types = _arrow_types(con, path)  # in column order
        return Layout(path, fmt, list(types), False, types=types)
    delimiter = delimiter or ("\t" if fmt == "tsv" else ",")
    if columns is not None:
        return Layout(path, fmt, list(columns), False, delimiter, encoding)
    return Layout(path, fmt, read_header(path, fmt, delimiter, encoding), True, delimiter, encoding)


def _arrow_types(con: duckdb.DuckDBPyConnection, path: str) -> dict[str, str]:
    """DuckDB's types for the columns of an Arrow stream (read from its schema, no batch scanned)."""
    con.register("arrow_schema", arrow_stream(path).schema.empty_table())
    try:
        return {row[0]: row[1] for row in con.execute("DESCRIBE SELECT * FROM arrow_schema").fetchall()}
    finally:
        con.unregister("arrow_schema")


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def scan_sql(con: duckdb.DuckDBPyConnection, layout: Layout, table_suffix: str) -> tuple[str, str, str, int]:
    """(FROM-clause for the raw file, raw-row SQL, record-number SQL, header lines) for one layout.

    An Arrow stream is registered on ``con`` as relation ``arrow_<suffix>`` (scanned once)."""
    p = sql_str(layout.path)
    rejects = f"store_rejects=true, rejects_table='rej_{table_suffix}', rejects_scan='rejscan_{table_suffix}'"
    cast_all = ", ".join(f"CAST({quote(c)} AS VARCHAR)" for c in layout.header)
    if layout.format == "parquet":
        return f"read_parquet({p}, file_row_number=true)", f"concat_ws(',', {cast_all})", "file_row_number", 0
    if layout.format == "arrow":
        name = f"arrow_{table_suffix}"
        con.register(name, arrow_stream(layout.path))
        return name, f"concat_ws(',', {cast_all})", "NULL", 0
    if layout.format == "jsonl":
        scan = (
            f"read_csv({p}, delim='\\x1f', quote='', escape='', header=false, auto_detect=false, "
            f"columns={{'line': 'VARCHAR'}}, encoding={sql_str(layout.encoding)}, {rejects})"
        )
        return scan, "line", "NULL", 0
    columns = "{" + ", ".join(f"{sql_str(c)}: 'VARCHAR'" for c in layout.header) + "}"
    quoting = "quote='', escape=''," if layout.format == "movielens" else "quote='\"', escape='\"',"
    header_lines = int(layout.has_header)
    scan = (
        f"read_csv({p}, delim={sql_str(layout.delimiter)}, {quoting} encoding={sql_str(layout.encoding)}, "
        f"header={str(layout.has_header).lower()}, auto_detect=false, columns={columns}, {rejects})"
    )
    raw = f"concat_ws({sql_str(layout.delimiter)}, " + ", ".join(quote(c) for c in layout.header) + ")"
    return scan, raw, "NULL", header_lines
