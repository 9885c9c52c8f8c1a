"""Per-user event histories in SQLite: bounded to the last N events, durable across restarts.

Every accepted write is committed before the request is answered. The database runs in WAL mode
with ``synchronous=NORMAL``: a committed event survives the server process being killed
(``--durability full`` also survives a power cut, at the cost of an fsync per request).
Items are stored by their external id, so histories stay valid when a retrained model with a
grown vocabulary is hot-reloaded. Items posted to the server (``POST /v1/items``) are kept too.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    user TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item TEXT NOT NULL,
    event_type TEXT,
    ts INTEGER NOT NULL,
    PRIMARY KEY (user, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS posted_items (
    item TEXT PRIMARY KEY,
    title TEXT,
    attributes TEXT
);
"""


@dataclass(frozen=True)
class Event:
    item: str
    event_type: str | None
    ts: int
    """Milliseconds since the epoch (int64 end to end)."""


class HistoryStore:
    """Last ``max_events`` events per user, in arrival order (``seq``)."""

    def __init__(self, path: Path, max_events: int, durability: str = "normal") -> None:
        if durability not in ("normal", "full"):
            raise ValueError(f"durability {durability!r}: choose normal or full")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_events = max_events
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={durability.upper()}")
        self.db.executescript(SCHEMA)

    def append(self, user: str, events: list[Event]) -> int:
        """Add events after the user's last one (one transaction); returns the user's history length."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            last = cur.execute("SELECT max(seq) FROM events WHERE user = ?", (user,)).fetchone()[0]
            start = 0 if last is None else last + 1
            cur.executemany(
                "INSERT INTO events (user, seq, item, event_type, ts) VALUES (?, ?, ?, ?, ?)",
                [(user, start + i, e.item, e.event_type, e.ts) for i, e in enumerate(events)],
            )
            end = start + len(events)
            cur.execute("DELETE FROM events WHERE user = ? AND seq < ?", (user, end - self.max_events))
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        return min(end, self.max_events)

    def history(self, user: str) -> list[Event]:
        """The user's stored events ordered by time (arrival order among equal timestamps)."""
        rows = self.db.execute(
            "SELECT item, event_type, ts FROM events WHERE user = ? ORDER BY ts, seq", (user,)
        ).fetchall()
        return [Event(*row) for row in rows]

    def histories_after(self, ts: int):
        """(user, stored events ordered by time) of every user with an event after ``ts`` (ms)."""
        rows = self.db.execute(
            "SELECT user, item, event_type, ts FROM events WHERE user IN "
            "(SELECT DISTINCT user FROM events WHERE ts > ?) ORDER BY user, ts, seq",
            (ts,),
        )
        user, events = None, []
        for row in rows:
            if row[0] != user:
                if events:
                    yield user, events
                user, events = row[0], []
            events.append(Event(*row[1:]))
        if events:
            yield user, events

    def put_items(self, rows: list[tuple[str, str | None, str | None]]) -> None:
        """Keep items posted to the server (id, title, attributes), in one transaction, so that a
        restarted or reloaded server places them again."""
        cur = self.db.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            cur.executemany("INSERT OR REPLACE INTO posted_items VALUES (?, ?, ?)", rows)
            cur.execute("COMMIT")
        except BaseException:
            cur.execute("ROLLBACK")
            raise

    def posted_items(self) -> list[tuple[str, str | None, str | None]]:
        return self.db.execute("SELECT item, title, attributes FROM posted_items ORDER BY rowid").fetchall()

    def users(self) -> int:
        return self.db.execute("SELECT count(DISTINCT user) FROM events").fetchone()[0]

    def close(self) -> None:
        self.db.close()
