"""The optional item metadata file of `bgpt shard --items`: id, title, attributes per item.

Public layouts name things differently (Yelp's ``business_id``, Amazon's ``asin``, MovieLens
100K's header-less ``u.item``), so every guess can be overridden: ``--items-id-col``,
``--items-title-col``, ``--items-attribute-cols``, ``--items-columns`` (names for a file without
a header), ``--items-delimiter``, ``--items-encoding``, ``--items-format``.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from data_sharding import layouts
from data_sharding.errors import DataError
from data_sharding.ingest import COLUMN_ALIASES
from data_sharding.layouts import quote, sql_str

TITLE_ALIASES = ("title", "name", "text", "description")


@dataclass
class ItemsConfig:
    """How to read the items file."""

    format: str = "auto"
    id_col: str | None = None
    """Item id column (default: the events' --item-col when the file has it, else a known item id name)."""
    title_col: str | None = None
    """Title/text column (default: the first of title, name, text, description)."""
    attribute_cols: list[str] | None = None
    """Columns that become the item's attributes (default: every other column not named like an id)."""
    columns: list[str] | None = None
    """Column names of a delimited file without a header row, in order."""
    delimiter: str | None = None
    encoding: str = "utf-8"

    def __post_init__(self) -> None:
        layouts.check_options(self.format, self.columns, self.delimiter, self.encoding, "items-")


def _is_id_column(name: str) -> bool:
    """Columns named like identifiers (item_idx, product_id, sku_id, uid) are not item attributes."""
    lower = name.lower()
    return lower.endswith(("_id", "_idx", "id", "_key")) or lower in ("idx", "index")


def _named(path: str, header: list[str], name: str | None, flag: str) -> str | None:
    if name is not None and name not in header:
        raise DataError(f"{path}: --{flag} {name!r} is not a column of the items file; columns are {header}")
    return name


def _roles(path: str, header: list[str], cfg: ItemsConfig, events_item_col: str | None) -> tuple[str, str | None, list]:
    """(id column, title column or None, attribute columns) of the items file."""
    lower = {h.strip().lower(): h for h in header}
    id_col = _named(path, header, cfg.id_col, "items-id-col")
    if id_col is None:
        guesses = ([events_item_col] if events_item_col in header else []) + [
            lower[a] for a in COLUMN_ALIASES["item"] if a in lower
        ]
        if not guesses:
            raise DataError(
                f"{path}: no item id column in the items file (looked for {', '.join(COLUMN_ALIASES['item'])}); "
                f"columns are {header}. Pass --items-id-col NAME."
            )
        id_col = guesses[0]
    title_col = _named(path, header, cfg.title_col, "items-title-col")
    if title_col is None:
        title_col = next((lower[a] for a in TITLE_ALIASES if a in lower and lower[a] != id_col), None)
    if cfg.attribute_cols is not None:
        attrs = [_named(path, header, a, "items-attribute-cols") for a in cfg.attribute_cols]
    else:
        attrs = [h for h in header if h not in (id_col, title_col) and not _is_id_column(h)]
    return id_col, title_col, attrs


def read_items_file(
    con: duckdb.DuckDBPyConnection, path: str, cfg: ItemsConfig, events_item_col: str | None = None
) -> str:
    """Load an item metadata file into table ``item_meta(item, title, attributes)``; return its name.

    ``attributes`` is ``name=value; ...`` over the attribute columns (nested JSON values as JSON text).
    """
    layout = layouts.file_layout(
        con, path, cfg.format, cfg.columns, cfg.delimiter, cfg.encoding, layouts.MOVIELENS_ITEM_COLUMNS
    )
    id_col, title_col, attrs = _roles(path, layout.header, cfg, events_item_col)
    if layout.format == "jsonl":
        scan = f"read_json({sql_str(path)}, format='newline_delimited', columns={{"
        scan += ", ".join(f"{sql_str(h)}: 'VARCHAR'" for h in layout.header) + "})"
    else:
        scan = layouts.scan_sql(con, layout, "items")[0]
    as_text = {h: f"CAST({quote(h)} AS VARCHAR)" for h in layout.header}
    parts = ", ".join(f"CASE WHEN {quote(h)} IS NOT NULL THEN {sql_str(h + '=')} || {as_text[h]} END" for h in attrs)
    attributes = f"nullif(concat_ws('; ', {parts}), '')" if attrs else "NULL"
    title = as_text[title_col] if title_col else "NULL"
    try:
        con.execute(
            f"CREATE OR REPLACE TABLE item_meta AS SELECT DISTINCT ON (item) trim({as_text[id_col]}) "
            f"AS item, {title} AS title, CAST({attributes} AS VARCHAR) AS attributes FROM {scan} "
            f"WHERE {quote(id_col)} IS NOT NULL"
        )
    except duckdb.Error as e:
        raise DataError(f"{path}: cannot read items file ({str(e).splitlines()[0]})") from None
    finally:
        if layout.format == "arrow":
            con.unregister("arrow_items")
    return "item_meta"
