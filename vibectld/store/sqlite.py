"""The SQLite engine under the registry: one file in the state directory, one connection.

WAL with synchronous=FULL, so a committed write survives a power cut; BEGIN IMMEDIATE,
so a write transaction holds the file's write lock from its first statement (another
process's writer waits `busy_timeout`, then fails with "database is locked"). The schema
is versioned with PRAGMA user_version (migrations.py). The file is created 0600 before
SQLite opens it.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vibectld.store.base import Transaction
from vibectld.store.migrations import _prepare_file, migrate
from vibectld.store.records import StorageFailure

T = TypeVar("T")

BUSY_TIMEOUT_MS = 5000


class _SQLiteTransaction:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._conn.executemany(sql, rows)

    def lock(self, key: str) -> None:
        # BEGIN IMMEDIATE already holds the only write lock there is.
        pass


class SQLiteDatabase:
    backend = "sqlite"
    shared = False  # one daemon owns the file

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self.path = path

    def __repr__(self) -> str:
        return f"SQLiteDatabase({str(self.path)!r})"

    @classmethod
    def open(cls, path: Path) -> SQLiteDatabase:
        """Open (creating 0600 and migrating if needed) the registry file at `path`."""
        try:
            _prepare_file(path)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StorageFailure(f"cannot open the client registry {path}: {e}") from None
        try:
            # First: another process opening the file at once makes the others wait.
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            mode = _journal_mode_wal(conn)
            if mode != "wal":
                raise StorageFailure(
                    f"{path}: SQLite refused WAL mode (got {mode!r}); keep the state "
                    "directory on a local filesystem"
                )
            conn.execute("PRAGMA synchronous = FULL")
            migrate(conn, path)
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StorageFailure(
                f"the client registry {path} is unreadable ({e}); restore it from a backup"
            ) from None
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StorageFailure("the client registry is closed")
        return self._conn

    def transaction(self, work: Callable[[Transaction], T]) -> T:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(_SQLiteTransaction(conn))
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StorageFailure(
                f"cannot write the client registry {self.path}: {e}; check the disk "
                "space and the state directory's permissions"
            ) from None
        return result

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        conn = self._connection()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StorageFailure(f"cannot read the client registry {self.path}: {e}") from None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _journal_mode_wal(conn: sqlite3.Connection) -> str:
    """Switch the file to WAL; the mode SQLite reports.

    Switching takes the file's exclusive lock, and SQLite answers "database is locked"
    at once, without its busy handler, while another connection opens the file: retry
    for as long as busy_timeout would have waited.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
