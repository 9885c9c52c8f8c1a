"""Raw event logs (CSV, TSV, Parquet, JSONL, MovieLens ``::``) -> a staged DuckDB relation.

Every input file is scanned once by DuckDB into an on-disk table holding, per row, the parsed
event (user, item, int64 millisecond timestamp, event type, value), the row's position in its
file, and, for rows that fail validation, the reason and the raw text. Rows DuckDB's reader
itself rejects (wrong column count, undecodable bytes) are kept in its rejects table. Nothing is
dropped silently: :func:`data_sharding.validate.file_quarantine` gathers both kinds.
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
from data_sharding.sequences import FILE_SHIFT, GEN_SHIFT

FORMATS = ("auto", "csv", "tsv", "parquet", "jsonl", "movielens")
# Column names recognised without a --*-col flag, in order of preference (compared case-insensitively).
COLUMN_ALIASES = {
    "user": ("user", "user_id", "userid", "uid", "reviewerid", "customer_id", "visitorid", "session_id"),
    "item": ("item", "item_id", "itemid", "iid", "movie_id", "movieid", "asin", "product_id", "sku"),
    "time": ("timestamp", "ts", "time", "event_time", "unixreviewtime", "datetime", "date"),
    "type": ("event_type", "type", "event", "behavior", "behaviour", "action"),
    "value": ("value", "rating", "score", "overall", "amount"),
}
MOVIELENS_EVENT_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
MOVIELENS_ITEM_COLUMNS = ("item_id", "title", "genres")
DEFAULT_EVENT_TYPE = "event"


@dataclass
class InputConfig:
    """Where the raw events are and how to read them."""

    paths: list[str] = field(default_factory=list)
    format: str = "auto"
    """One of auto, csv, tsv, parquet, jsonl, movielens; auto picks by file extension."""
    user_col: str | None = None
    item_col: str | None = None
    time_col: str | None = None
    type_col: str | None = None
    """Optional: without it every event has the type "event"."""
    value_col: str | None = None
    """Optional numeric value per event, e.g. a rating."""
    time_unit: str = "auto"
    """Unit of numeric timestamps: s, ms, or auto (values >= 1e11 are milliseconds)."""
    min_time: str = "1970-01-02"
    """Earliest accepted timestamp (ISO 8601); older rows are quarantined."""
    max_time: str = "2100-01-01"
    """Latest accepted timestamp (ISO 8601); later rows are quarantined."""
    max_id_length: int = 256
    """User and item ids longer than this are quarantined."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(f"unknown --format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if self.time_unit not in ("auto", "s", "ms"):
            raise DataError(f"unknown --time-unit {self.time_unit!r}; choose auto, s or ms")


@dataclass
class SourceFile:
    """One input file as staged: its table, layout and how many rows DuckDB read."""

    index: int
    path: str
    format: str
    table: str
    rejects_table: str | None
    """DuckDB's table of rows its reader refused (None for Parquet)."""
    header_lines: int


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
    raise DataError(f"{path}: cannot tell the format from the extension; pass --format")


def _open_text(path: str, encoding: str) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")


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


def read_header(path: str, fmt: str) -> list[str]:
    """Column names of a delimited or JSONL file, read from its first line."""
    if fmt == "movielens":
        return list(MOVIELENS_EVENT_COLUMNS)
    with _open_text(path, "utf-8") as f:
        first = f.readline().rstrip("\r\n")
    if not first.strip():
        raise DataError(f"{path}: the first line is empty; expected a header")
    if fmt == "jsonl":
        try:
            record = json.loads(first)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:1: not a JSON object ({e.msg}); is this really JSONL?") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:1: expected a JSON object per line")
        return list(record)
    delimiter = "\t" if fmt == "tsv" else ","
    return next(csv.reader([first], delimiter=delimiter))


def resolve_columns(path: str, header: list[str], cfg: InputConfig) -> dict[str, str | None]:
    """Map the roles user/item/time/type/value to header names; error on a missing column."""
    lower = {name.strip().lower(): name for name in header}
    resolved: dict[str, str | None] = {}
    for role, aliases in COLUMN_ALIASES.items():
        flag = getattr(cfg, f"{role}_col")
        if flag is not None:
            if flag not in header:
                raise DataError(f"{path}: --{role}-col {flag!r} is not a column; columns are {header}")
            resolved[role] = flag
            continue
        resolved[role] = next((lower[a] for a in aliases if a in lower), None)
        if resolved[role] is None and role in ("user", "item", "time"):
            hint = ""
            if len(header) == 1 and any(d in header[0] for d in ",\t;|"):
                hint = " (only one column: wrong delimiter or --format?)"
            raise DataError(
                f"{path}: no {role} column (looked for {', '.join(aliases)}); columns are {header}{hint}. "
                f"Pass --{role}-col NAME."
            )
    return resolved


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _field_sql(fmt: str, column: str | None) -> str | None:
    """SQL for one input field as VARCHAR (NULL when empty)."""
    if column is None:
        return None
    if fmt == "jsonl":
        valid_line = "CASE WHEN json_valid(line) AND json_type(line) = 'OBJECT' THEN line END"
        return f"nullif(json_extract_string({valid_line}, {_sql_str('$.' + json.dumps(column))}), '')"
    if fmt == "parquet":
        return f"nullif(CAST({_quote(column)} AS VARCHAR), '')"
    return f"nullif({_quote(column)}, '')"


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _validated_select(fmt: str, cols: dict[str, str | None], cfg: InputConfig, raw_sql: str, rec_sql: str) -> str:
    """SELECT over CTE ``src`` that parses each row once and names the first reason it is invalid.

    Layered so every field is trimmed and cast once: fields -> numbers -> timestamp -> reason.
    """
    fields = {role: _field_sql(fmt, cols[role]) for role in ("user", "item", "time", "type", "value")}
    trimmed = ", ".join(f"trim({sql}) AS _{role}" for role, sql in fields.items() if sql)
    vnum = "TRY_CAST(_value AS DOUBLE)" if fields["value"] else "NULL::DOUBLE"
    scale = {"s": "1000.0", "ms": "1.0"}.get(cfg.time_unit, "CASE WHEN abs(_tnum) >= 1e11 THEN 1.0 ELSE 1000.0 END")
    ts = (
        f"CASE WHEN _tnum IS NOT NULL THEN TRY_CAST(round(_tnum * {scale}) AS BIGINT) "
        f"ELSE epoch_ms(TRY_CAST(_time AS TIMESTAMPTZ)) END"
    )
    lo = f"epoch_ms(TIMESTAMPTZ {_sql_str(cfg.min_time)})"
    hi = f"epoch_ms(TIMESTAMPTZ {_sql_str(cfg.max_time)})"
    checks = []
    if fmt == "jsonl":
        checks.append("WHEN NOT json_valid(line) OR json_type(line) <> 'OBJECT' THEN 'malformed_json'")
    else:
        checks.append(
            f"WHEN _user = {_sql_str(cols['user'])} AND _item = {_sql_str(cols['item'])} THEN 'repeated_header'"
        )
    checks += [
        "WHEN _user IS NULL OR _user = '' THEN 'missing_user'",
        "WHEN _item IS NULL OR _item = '' THEN 'missing_item'",
        f"WHEN strlen(_user) > {cfg.max_id_length} AND length(_user) > {cfg.max_id_length} THEN 'user_id_too_long'",
        f"WHEN strlen(_item) > {cfg.max_id_length} AND length(_item) > {cfg.max_id_length} THEN 'item_id_too_long'",
        # NUL and other C0/DEL bytes: invisible in logs and terminals, and cut short by C strings downstream.
        "WHEN regexp_matches(_user, '[[:cntrl:]]') THEN 'user_id_control_character'",
        "WHEN regexp_matches(_item, '[[:cntrl:]]') THEN 'item_id_control_character'",
        "WHEN _time IS NULL OR _time = '' THEN 'missing_timestamp'",
        "WHEN _ts_ms IS NULL THEN 'bad_timestamp'",
        f"WHEN _ts_ms < {lo} OR _ts_ms > {hi} THEN 'timestamp_out_of_range'",
    ]
    if fields["type"]:
        checks.append("WHEN _type IS NULL OR _type = '' THEN 'missing_event_type'")
    if fields["value"]:
        checks.append(
            "WHEN _value IS NOT NULL AND _value <> '' AND (_vnum IS NULL OR NOT isfinite(_vnum)) THEN 'bad_value'"
        )
    reason = "CASE " + " ".join(checks) + " END"
    etype = "_type" if fields["type"] else _sql_str(DEFAULT_EVENT_TYPE)
    return (
        f"SELECT _user AS user, _item AS item, _ts_ms AS ts, {etype} AS event_type, CAST(_vnum AS FLOAT) AS value, "
        f"{rec_sql} AS rec, _reason AS reason, CASE WHEN _reason IS NOT NULL THEN {raw_sql} END AS raw FROM ("
        f"SELECT *, {reason} AS _reason FROM ("
        f"SELECT *, {ts} AS _ts_ms FROM ("
        f"SELECT *, TRY_CAST(_time AS DOUBLE) AS _tnum, {vnum} AS _vnum FROM ("
        f"SELECT *, {trimmed} FROM src))))"
    )


def _scan_sql(path: str, fmt: str, header: list[str], table_suffix: str) -> tuple[str, str, str, int]:
    """(FROM-clause for the raw file, raw-row SQL, record-number SQL, header lines) for one format."""
    p = _sql_str(path)
    rejects = f"store_rejects=true, rejects_table='rej_{table_suffix}', rejects_scan='rejscan_{table_suffix}'"
    if fmt == "parquet":
        cols = ", ".join(f"CAST({_quote(c)} AS VARCHAR)" for c in header)
        return f"read_parquet({p}, file_row_number=true)", f"concat_ws(',', {cols})", "file_row_number", 0
    if fmt == "jsonl":
        scan = (
            f"read_csv({p}, delim='\\x1f', quote='', escape='', header=false, auto_detect=false, "
            f"columns={{'line': 'VARCHAR'}}, {rejects})"
        )
        return scan, "line", "NULL", 0
    delimiter = {"csv": ",", "tsv": "\t", "movielens": "::"}[fmt]
    columns = "{" + ", ".join(f"{_sql_str(c)}: 'VARCHAR'" for c in header) + "}"
    quoting = "quote='', escape=''," if fmt == "movielens" else "quote='\"', escape='\"',"
    encoding = "encoding='latin-1'," if fmt == "movielens" else ""
    header_lines = 0 if fmt == "movielens" else 1
    scan = (
        f"read_csv({p}, delim={_sql_str(delimiter)}, {quoting} {encoding} header={str(bool(header_lines)).lower()}, "
        f"auto_detect=false, columns={columns}, {rejects})"
    )
    raw = f"concat_ws({_sql_str(delimiter)}, " + ", ".join(_quote(c) for c in header) + ")"
    return scan, raw, "NULL", header_lines


def stage_file(con: duckdb.DuckDBPyConnection, index: int, path: str, cfg: InputConfig) -> SourceFile:
    """Scan one input file into table ``src_<index>`` (parsed rows + reasons)."""
    check_readable(path)
    fmt = cfg.format if cfg.format != "auto" else detect_format(path)
    if fmt == "parquet":
        try:
            header = [row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()]
        except duckdb.Error as e:
            raise DataError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    else:
        header = read_header(path, fmt)
    cols = resolve_columns(path, header, cfg)
    scan, raw, rec, header_lines = _scan_sql(path, fmt, header, str(index))
    table = f"src_{index}"
    select = _validated_select(fmt, cols, cfg, raw, rec)
    try:
        # CREATE TABLE AS keeps the scan's row order (preserve_insertion_order), so rowid is the
        # record's position among the rows the reader accepted: the tie-break for equal timestamps.
        con.execute(f"CREATE OR REPLACE TABLE {table} AS WITH src AS (SELECT * FROM {scan}) {select}")
        if fmt == "jsonl":
            # Blank lines are not rows. DELETE keeps the other rows' rowids, so line numbers stay right.
            con.execute(f"DELETE FROM {table} WHERE reason IS NOT NULL AND (raw IS NULL OR trim(raw) = '')")
    except duckdb.Error as e:
        raise DataError(f"{path}: cannot read as {fmt} ({str(e).splitlines()[0]})") from None
    rows = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
    rejects = None if fmt == "parquet" else f"rej_{index}"
    rejected = con.execute(f"SELECT count(DISTINCT line) FROM {rejects}").fetchall()[0][0] if rejects else 0
    if rows == 0 and rejected == 0:
        raise DataError(f"{path}: has no rows")
    return SourceFile(index, path, fmt, table, rejects, header_lines)


def valid_events_sql(src: SourceFile, generation: int) -> str:
    """The valid rows of one staged file with ``ord``: generation, file and record position in one int64."""
    return (
        f"SELECT user, item, ts, event_type, value, "
        f"({generation}::BIGINT << {GEN_SHIFT}) | ({src.index}::BIGINT << {FILE_SHIFT}) | coalesce(rec, rowid) AS ord "
        f"FROM {src.table} WHERE reason IS NULL"
    )


def _is_id_column(name: str) -> bool:
    """Columns named like identifiers (item_idx, product_id, sku_id, uid) are not item attributes."""
    lower = name.lower()
    return lower.endswith(("_id", "_idx", "id", "_key")) or lower in ("idx", "index")


def read_items_file(con: duckdb.DuckDBPyConnection, path: str, fmt: str, item_col: str | None) -> str:
    """Load an item metadata file into table ``item_meta(item, title, attributes)``; return the table name.

    The id column is ``item_col`` (or a recognised item alias); ``title`` is the first of
    title/name/text/description; every other column, except those named like ids (``*_id``,
    ``*_idx``), goes into ``attributes`` as ``name=value; ...``.
    """
    check_readable(path)
    fmt = fmt if fmt != "auto" else detect_format(path)
    if fmt == "movielens":
        header = list(MOVIELENS_ITEM_COLUMNS)
    elif fmt == "parquet":
        header = [row[0] for row in con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()]
    else:
        header = read_header(path, fmt)
    lower = {h.lower(): h for h in header}
    id_col = item_col if item_col in header else next((lower[a] for a in COLUMN_ALIASES["item"] if a in lower), None)
    if id_col is None:
        raise DataError(f"{path}: no item id column in the items file; columns are {header}")
    title_col = next((lower[a] for a in ("title", "name", "text", "description") if a in lower), None)
    others = [h for h in header if h not in (id_col, title_col)]
    if fmt == "jsonl":
        scan = f"read_json({_sql_str(path)}, format='newline_delimited', columns={{"
        scan += ", ".join(f"{_sql_str(h)}: 'VARCHAR'" for h in header) + "})"
    elif fmt == "parquet":
        scan = f"read_parquet({_sql_str(path)})"
    else:
        scan, _, _, _ = _scan_sql(path, fmt, header, "items")
    others = [h for h in others if not _is_id_column(h)]
    attrs = ", ".join(f"CASE WHEN {_quote(h)} IS NOT NULL THEN {_sql_str(h + '=')} || {_quote(h)} END" for h in others)
    attributes = f"nullif(concat_ws('; ', {attrs}), '')" if others else "NULL"
    title = f"CAST({_quote(title_col)} AS VARCHAR)" if title_col else "NULL"
    try:
        con.execute(
            f"CREATE OR REPLACE TABLE item_meta AS SELECT DISTINCT ON (item) trim(CAST({_quote(id_col)} AS VARCHAR)) "
            f"AS item, {title} AS title, CAST({attributes} AS VARCHAR) AS attributes FROM {scan} "
            f"WHERE {_quote(id_col)} IS NOT NULL"
        )
    except duckdb.Error as e:
        raise DataError(f"{path}: cannot read items file ({str(e).splitlines()[0]})") from None
    return "item_meta"
