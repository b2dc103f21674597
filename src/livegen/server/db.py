"""The SQLite database in the data dir: one file, WAL, a schema applied at open.

Each store applies its own tables with ``migrate``. Calls are short and synchronous under one
lock; the async side calls them directly (they take
microseconds) or through ``anyio.to_thread`` for anything that may wait on the disk.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from livegen.server.disk import storage_faults


class Database:
    """A SQLite connection shared by threads, serialised by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    @classmethod
    @contextmanager
    def open(cls, path: Path) -> Iterator[Database]:
        db = cls(path)
        db.connect()
        try:
            yield db
        finally:
            db.close()

    def connect(self) -> None:
        if self._conn is not None:
            raise RuntimeError("database already open")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        self._conn = conn

    def migrate(self, schema: str) -> None:
        """Apply a store's ``CREATE TABLE IF NOT EXISTS ...`` script (each store owns its tables)."""
        with self._lock:
            self._require().executescript(schema)

    def add_column(self, table: str, column: str, declaration: str) -> None:
        """Add ``column`` to a table created before it existed (a data dir from an older livegen);
        nothing if it is there. ``table``, ``column`` and ``declaration`` are livegen's own
        constants, never input."""
        with self._lock:
            conn = self._require()
            if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def close(self) -> None:
        # Under the lock: closing a connection another thread is using crashes the process.
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        with self._lock, storage_faults():
            return self._require().execute(sql, params).rowcount

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, storage_faults():
            return self._require().execute(sql, params).fetchall()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: everything inside commits together or not at all (a COMMIT
        that fails, e.g. on a full disk, rolls back too: the connection never stays inside a
        transaction that every later ``BEGIN`` would trip over)."""
        with self._lock, storage_faults():
            conn = self._require()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("database is closed")
        return self._conn
