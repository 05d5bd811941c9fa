"""The store contract suite's one fixture: a backend, SQLite or PostgreSQL, to open stores on.

    def test_something(backend: Backend) -> None:
        store = backend.open(now=NOW)         # a Registry on this test's database
        backend.sql("SELECT ...")             # rows through another connection, as another
                                              # process (or node) would read them
        with backend.failing("usage"):        # every INSERT/UPDATE on a table fails
            ...
        with backend.gone(store):             # the database goes away under the store
            ...

Each test gets a fresh database: a file in tmp_path, or its own PostgreSQL database on
the session's server (tests/postgres.py). Stores opened through `open` are closed at the
end of the test.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.postgres import Postgres
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import Registry
from vibectld.store.sqlite import SQLiteDatabase

BACKENDS = ("sqlite", "postgresql")


class Backend:
    name: str

    def __init__(self) -> None:
        self._opened: list[Registry] = []

    def open(self, now: int | None = None) -> Registry:
        store = Registry.load(self.database(), now=now)
        self._opened.append(store)
        return store

    def database(self) -> SQLiteDatabase | PostgreSQLDatabase:
        raise NotImplementedError

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One statement (with `?` placeholders) through a connection of its own."""
        raise NotImplementedError

    @contextlib.contextmanager
    def failing(self, table: str, events: Sequence[str] = ("INSERT", "UPDATE")) -> Iterator[None]:
        """Every `events` statement on `table` fails with 'disk on fire' while inside."""
        raise NotImplementedError
        yield

    @contextlib.contextmanager
    def gone(self, store: Registry) -> Iterator[None]:
        """The database cannot be written (SQLite) or reached (PostgreSQL) while inside."""
        raise NotImplementedError
        yield

    def close_all(self) -> None:
        for store in self._opened:
            with contextlib.suppress(Exception):
                store.close()


class SQLiteBackend(Backend):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def database(self) -> SQLiteDatabase:
        return SQLiteDatabase.open(self.path)

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.path, isolation_level=None)
        try:
            return con.execute(statement, params).fetchall()
        finally:
            con.close()

    @contextlib.contextmanager
    def failing(self, table: str, events: Sequence[str] = ("INSERT", "UPDATE")) -> Iterator[None]:
        for event in events:
            self.sql(
                f"CREATE TRIGGER fail_{table}_{event} BEFORE {event} ON {table} "
                "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
            )
        try:
            yield
        finally:
            for event in events:
                self.sql(f"DROP TRIGGER fail_{table}_{event}")

    @contextlib.contextmanager
    def gone(self, store: Registry) -> Iterator[None]:
        # As tests/integration/test_admin_storage_failure.py: a read-only connection on
        # the same file makes SQLite refuse every write, whoever the tests run as.
        db = store._db
        assert isinstance(db, SQLiteDatabase)
        read_only = sqlite3.connect(
            f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
        with store._db_lock:
            writable, db._conn = db._conn, read_only
        try:
            yield
        finally:
            with store._db_lock:
                db._conn = writable
            read_only.close()


class PostgreSQLBackend(Backend):
    name = "postgresql"

    def __init__(self, postgres: Postgres) -> None:
        super().__init__()
        self.postgres = postgres

    def database(self) -> PostgreSQLDatabase:
        return PostgreSQLDatabase.open(self.postgres.dsn)

    def sql(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.postgres.dsn, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []

    @contextlib.contextmanager
    def failing(self, table: str, events: Sequence[str] = ("INSERT", "UPDATE")) -> Iterator[None]:
        self.sql(
            "CREATE OR REPLACE FUNCTION fail() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'disk on fire'; END $$"
        )
        self.sql(
            f"CREATE TRIGGER fail_{table} BEFORE {' OR '.join(events)} ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION fail()"
        )
        try:
            yield
        finally:
            self.sql(f"DROP TRIGGER fail_{table} ON {table}")

    @contextlib.contextmanager
    def gone(self, store: Registry) -> Iterator[None]:
        self.postgres.stop()
        try:
            yield
        finally:
            self.postgres.start()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each contract test runs once on SQLite and once on PostgreSQL."""
    chosen: Backend
    if request.param == "sqlite":
        chosen = SQLiteBackend(tmp_path / "state" / "registry.db")
    else:
        chosen = PostgreSQLBackend(request.getfixturevalue("postgres"))
    try:
        yield chosen
    finally:
        chosen.close_all()


def drop(reg: Registry) -> None:
    """What kill -9 leaves of `reg`: no flush, no close; its descriptors closed as the
    kernel closes them (the journal's flock goes with them)."""
    if reg._listener is not None:
        reg._listener.stop()
    db, reg._db = reg._db, None
    assert db is not None
    db.close()
    journal = reg._journal
    assert journal is not None
    for fd in (journal._fd, journal._lock_fd):
        if fd is not None:
            os.close(fd)
    journal._fd = journal._lock_fd = None
