"""Quarantine: every rejected row with its file, line, raw text and reason, and the bad-row budget."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from data_sharding.errors import DataError
from data_sharding.ingest import SourceFile
from data_sharding.sequences import FILE_SHIFT

# DuckDB reader errors -> our reason names.
READER_REASONS = {
    "MISSING COLUMNS": "wrong_column_count",
    "TOO MANY COLUMNS": "wrong_column_count",
    "INVALID ENCODING": "undecodable_bytes",
    "INVALID UNICODE": "undecodable_bytes",
    "UNQUOTED VALUE": "bad_quoting",
    "LINE SIZE OVER MAXIMUM": "line_too_long",
    "CAST": "bad_value",
}
_ROW_SCHEMA = pa.schema([("line", pa.int64()), ("reason", pa.string()), ("raw", pa.string())])


@dataclass
class QuarantineReport:
    """Counts of valid and rejected rows, overall and per file and reason."""

    valid_rows: int = 0
    bad_rows: int = 0
    by_reason: Counter = field(default_factory=Counter)
    by_file: dict[str, Counter] = field(default_factory=dict)

    @property
    def bad_fraction(self) -> float:
        total = self.valid_rows + self.bad_rows
        return self.bad_rows / total if total else 0.0

    def to_dict(self) -> dict:
        return {
            "valid_rows": self.valid_rows,
            "bad_rows": self.bad_rows,
            "bad_fraction": round(self.bad_fraction, 8),
            "by_reason": dict(sorted(self.by_reason.items())),
            "by_file": {f: dict(sorted(c.items())) for f, c in self.by_file.items()},
        }


def _line_numbers(records: np.ndarray, reject_lines: np.ndarray, header_lines: int) -> np.ndarray:
    """1-based file line of each accepted record, given the (sorted) lines the reader rejected.

    Record r sits on the smallest line L with L - header_lines - #rejects(<= L) == r + 1; a fixed
    point that converges in at most len(reject_lines) + 1 rounds (usually one or two).
    """
    lines = records + header_lines + 1
    for _ in range(len(reject_lines) + 1):
        shifted = records + header_lines + 1 + np.searchsorted(reject_lines, lines, side="right")
        if np.array_equal(shifted, lines):
            break
        lines = shifted
    return lines


@dataclass
class FileQuarantine:
    """One staged input file's rejected rows (file, line, reason, raw) and its number of valid rows."""

    path: str
    rows: pa.Table
    valid_rows: int

    def named(self, given: str) -> FileQuarantine:
        """The same rows under the file name the user gave (a URL, a relative path)."""
        if given == self.path:
            return self
        rows = self.rows.set_column(0, "file", pa.array([given] * self.rows.num_rows, pa.string()))
        return FileQuarantine(given, rows, self.valid_rows)


def file_quarantine(con: duckdb.DuckDBPyConnection, src: SourceFile) -> FileQuarantine:
    """Both kinds of rejected rows of one file staged as Parquet (``ingest.stage_file(...,
    parquet=...)``), by line, with the count of valid rows."""
    parts = []
    reject_lines = np.empty(0, dtype=np.int64)
    if src.rejects_table is not None:
        rejected = con.sql(
            f"SELECT line, first(error_type ORDER BY column_idx) AS error_type, first(csv_line) AS raw "
            f"FROM {src.rejects_table} GROUP BY line ORDER BY line"
        ).to_arrow_table()
        reject_lines = rejected["line"].to_numpy().astype(np.int64)
        reasons = [READER_REASONS.get(e, e.lower().replace(" ", "_")) for e in rejected["error_type"].to_pylist()]
        parts.append(pa.table([reject_lines, reasons, rejected["raw"]], schema=_ROW_SCHEMA))
    # The record's position is ord's low bits: the Parquet row number, else the rowid among accepted rows.
    bad = con.sql(
        f"SELECT ord & {(1 << FILE_SHIFT) - 1} AS pos, reason, raw FROM {src.table} WHERE reason IS NOT NULL "
        "ORDER BY pos"
    ).to_arrow_table()
    if bad.num_rows:
        positions = bad["pos"].to_numpy().astype(np.int64)
        parquet = src.format == "parquet"  # a row number (1-based), else a line among the accepted ones
        lines = positions + 1 if parquet else _line_numbers(positions, reject_lines, src.header_lines)
        parts.append(pa.table([lines, bad["reason"], bad["raw"].cast(pa.string())], schema=_ROW_SCHEMA))
    table = pa.concat_tables(parts or [_ROW_SCHEMA.empty_table()]).sort_by("line")
    table = table.add_column(0, "file", pa.array([src.path] * table.num_rows, pa.string()))
    valid = con.execute(f"SELECT count(*) FROM {src.table} WHERE reason IS NULL").fetchall()[0][0]
    return FileQuarantine(src.path, table, int(valid))


def write_quarantine(
    con: duckdb.DuckDBPyConnection, files: list[FileQuarantine], out_path: Path | None
) -> QuarantineReport:
    """Count valid and bad rows over all files (in input order); write the bad ones to ``out_path`` (JSONL)."""
    report = QuarantineReport()
    tables = []
    for fq in files:
        table = fq.rows
        counts = Counter(table["reason"].to_pylist()) if table.num_rows else Counter()
        report.by_file[fq.path] = counts
        report.by_reason.update(counts)
        report.bad_rows += table.num_rows
        report.valid_rows += fq.valid_rows
        if table.num_rows:
            tables.append(table)
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_suffix(".tmp")
        if tables:
            con.register("quarantine_rows", pa.concat_tables(tables))
            con.execute(f"COPY quarantine_rows TO '{tmp}' (FORMAT json)")
            con.unregister("quarantine_rows")
        else:
            tmp.write_text("")
        tmp.replace(out_path)
    return report


def check_bad_budget(report: QuarantineReport, max_bad_fraction: float, quarantine_path: Path | None) -> None:
    """Fail, naming the worst file and reason, when too many rows were rejected or none is valid."""
    where = f"; see {quarantine_path}" if quarantine_path else ""
    if report.valid_rows == 0:
        reasons = ", ".join(f"{r}: {n}" for r, n in report.by_reason.most_common(3))
        raise DataError(f"no valid rows in the input ({report.bad_rows} rejected: {reasons}){where}")
    if report.bad_fraction <= max_bad_fraction:
        return
    worst_file, counts = max(report.by_file.items(), key=lambda kv: sum(kv[1].values()))
    reason, count = counts.most_common(1)[0]
    raise DataError(
        f"{report.bad_fraction:.2%} of rows are bad (limit --max-bad-fraction {max_bad_fraction:.2%}); "
        f"worst file {worst_file}: {sum(counts.values())} bad rows, mostly {reason} ({count}){where}. "
        f"No shards were written."
    )
