"""The PostgreSQL engine under the registry, for several nodes sharing one database.

The connection string is the operator's libpq string (the `postgresql-dsn` credential),
handed to libpq as it is; it is never logged and never part of an error message (the
target is named by host, port and database only). One connection, used by one thread at
a time (the Registry serialises it), in autocommit mode with explicit transactions; a
connection that breaks is dropped and the next operation connects again.

Durability as with SQLite: a transaction returns only once the server has committed it,
and a session whose database says `synchronous_commit = off` turns it back on.

SQL is shared with SQLite (`?` placeholders, translated here); the schema and its
versions are postgresql_schema.py.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from vibectld.store.base import Transaction
from vibectld.store.postgresql_schema import migrate
from vibectld.store.records import StorageFailure

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 5  # unless the connection string says otherwise
# A connection unused for longer is checked with a round trip before a write uses it.
IDLE_CHECK_SECONDS = 1.0


@functools.lru_cache(maxsize=256)
def translate(sql: str) -> str:
    """The statement with `?` placeholders as psycopg's `%s` (and a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


Connection = psycopg.Connection[tuple[Any, ...]]


class _PostgreSQLTransaction:
    def __init__(self, cursor: psycopg.Cursor[tuple[Any, ...]]) -> None:
        self._cursor = cursor

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._cursor.execute(translate(sql), params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._cursor.execute(translate(sql), params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(translate(sql), rows)

    def lock(self, key: str) -> None:
        self._cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


class PostgreSQLDatabase:
    backend = "postgresql"
    shared = True  # every node writes it

    def __init__(self, conninfo: str, where: str, password: str | None) -> None:
        self._conninfo = conninfo
        self.where = where  # "the PostgreSQL database NAME on HOST:PORT", no secrets
        self._password = password
        self._conn: Connection | None = None
        self._closed = False
        self._used_at = 0.0  # time.monotonic() of the connection's last successful use

    def __repr__(self) -> str:
        return f"PostgreSQLDatabase({self.where!r})"

    @property
    def conninfo(self) -> str:
        """The libpq string (a secret: it may hold a password), for the other
        connections a node opens to the same database (notifications, limits)."""
        return self._conninfo

    def clean(self, error: psycopg.Error) -> str:
        """A driver error as one line for a message, with the password taken out."""
        return self._clean(error)

    @classmethod
    def open(cls, dsn: str) -> PostgreSQLDatabase:
        """Connect with the libpq string `dsn` and create or migrate the schema."""
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's message may quote part of the string, which may hold a password.
            raise StorageFailure(
                "the postgresql-dsn credential is not a libpq connection string "
                "(host=... dbname=... user=... or postgresql://...); fix the file"
            ) from None
        extra: dict[str, str | int] = {
            "application_name": "vibectld",
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        }
        conninfo = make_conninfo(dsn, **{k: v for k, v in extra.items() if k not in params})
        password = params.get("password")
        db = cls(conninfo, _describe(params), str(password) if password else None)
        try:
            db._run(lambda conn: migrate(conn, db.where), "create the schema in")
        except BaseException:
            db.close()
            raise
        return db

    def transaction(self, work: Callable[[Transaction], T]) -> T:
        def run(conn: Connection) -> T:
            # Explicit statements rather than conn.transaction(), so that a break before
            # COMMIT (safe to run again) is told apart from one during it (not safe).
            with _before_commit(conn):
                conn.execute("BEGIN")
                try:
                    with conn.cursor() as cursor:
                        result = work(_PostgreSQLTransaction(cursor))
                except BaseException:
                    if not conn.broken:
                        conn.execute("ROLLBACK")
                    raise
            conn.execute("COMMIT")
            return result

        return self._run(run, "write")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run(conn: Connection) -> list[tuple[Any, ...]]:
            with _before_commit(conn):  # a read has nothing to commit
                return conn.execute(translate(sql), params).fetchall()

        return self._run(run, "read")

    def close(self) -> None:
        self._closed = True
        self._drop()

    # -- the connection -----------------------------------------------------------------

    def _run(self, work: Callable[[Connection], T], verb: str) -> T:
        """`work` on the connection; once more on a new one if the first broke before
        anything was committed (a restarted server), else StorageFailure."""
        for attempt in (1, 2):
            if self._closed:
                raise StorageFailure("the client registry is closed")
            conn = self._connection()
            try:
                return work(conn)
            except _NotCommitted as e:
                self._drop()
                error: psycopg.Error = e.error
                if attempt == 1:
                    continue
            except psycopg.Error as e:
                if conn.broken or isinstance(e, psycopg.OperationalError):
                    self._drop()  # the next operation connects again
                error = e
            break
        raise StorageFailure(
            f"cannot {verb} the client registry, {self.where}: {self._clean(error)}"
        ) from None

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            if time.monotonic() - self._used_at < IDLE_CHECK_SECONDS:
                self._used_at = time.monotonic()
                return conn
            # Idle for a while: the server may have restarted since. A failed write cannot
            # be retried safely (was it committed?), but a failed ping can.
            try:
                conn.execute("SELECT 1")
                self._used_at = time.monotonic()
                return conn
            except psycopg.Error:
                pass
        self._drop()
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as e:
            raise StorageFailure(
                f"cannot reach the client registry, {self.where}: {self._clean(e)}; check "
                "that PostgreSQL is running and reachable, and the postgresql-dsn credential"
            ) from None
        try:
            # Durable before acknowledged, whatever the database's default says.
            if conn.execute("SHOW synchronous_commit").fetchone() == ("off",):
                conn.execute("SET synchronous_commit = on")
        except psycopg.Error as e:
            conn.close()
            raise StorageFailure(f"cannot use {self.where}: {self._clean(e)}") from None
        self._conn = conn
        self._used_at = time.monotonic()
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # already gone
                conn.close()

    def _clean(self, error: psycopg.Error) -> str:
        """The driver's message on one line, with the password (if any) taken out."""
        text = " ".join(str(error).split()) or type(error).__name__
        if self._password:
            text = text.replace(self._password, "[redacted]")
        return text


class _NotCommitted(Exception):
    """The connection broke before COMMIT was sent: nothing was written, so the work may
    run again on a new connection. (A break during COMMIT is not this: it may have
    committed, and running it again could count usage twice.)"""

    def __init__(self, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _before_commit(conn: Connection) -> Iterator[None]:
    try:
        yield
    except psycopg.OperationalError as e:
        if conn.broken:
            raise _NotCommitted(e) from None
        raise


def _describe(params: dict[str, Any]) -> str:
    """The target of a connection string, for messages: never its password."""
    if params.get("service"):
        return f"the PostgreSQL service {params['service']!r}"
    dbname = params.get("dbname") or params.get("user") or "(the default database)"
    host = str(params.get("host") or params.get("hostaddr") or "the local socket")
    port = params.get("port")
    where = f"{host}:{port}" if port and not re.search(r"[,/]", host) else host
    return f"the PostgreSQL database {dbname!r} on {where}"
