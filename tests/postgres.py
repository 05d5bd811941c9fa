"""PostgreSQL fixtures: one real server per test session, one fresh database per test.

    from tests.postgres import postgres, postgres_server  # in a conftest.py

    def test_something(postgres: Postgres) -> None:
        dsn = postgres.dsn            # libpq keyword/value string with a password, own db
        postgres.restart()            # pg_ctl restart -m fast: every connection is cut
        postgres.stop(); postgres.start()
        other = postgres.create_database("second")   # another empty database's DSN

The server is started once per session by bench/postgres.py (initdb + pg_ctl, as `nobody`
when the tests run as root, fsync off) and stopped with `pg_ctl stop -m fast` at the end.
Each test's database is created from template0 (about 30 ms) and dropped WITH (FORCE)
after it, so a daemon's pool left connected cannot keep it. A test that stops the server
gets it started again before the next test.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator

import pytest

from bench.postgres import PostgresCluster, PostgresUnavailable

_counter = itertools.count(1)


def _database_name(test_name: str) -> str:
    """A unique, valid database name that still says which test made it."""
    slug = re.sub(r"[^a-z0-9_]+", "_", test_name.lower()).strip("_")
    return f"t{next(_counter)}_{slug}"[:63]


class Postgres:
    """What a test gets: its own database on the session's server, and the server's
    lifecycle (which every other database on it shares)."""

    def __init__(self, cluster: PostgresCluster, dbname: str) -> None:
        self.cluster = cluster
        self.dbname = dbname
        self._extra: list[str] = []

    @property
    def dsn(self) -> str:
        """This test's database as a libpq keyword/value string, password included."""
        return self.cluster.dsn_for(self.dbname)

    @property
    def url(self) -> str:
        """The same as a postgresql:// URI."""
        return self.cluster.url_for(self.dbname)

    @property
    def socket_dsn(self) -> str:
        """This test's database over the server's Unix socket."""
        return self.cluster.dsn_for(self.dbname, unix_socket=True)

    @property
    def port(self) -> int:
        return self.cluster.port

    def create_database(self, name: str) -> str:
        """Another empty database for this test (dropped after it); its DSN."""
        full = _database_name(f"{self.dbname}_{name}")
        self._extra.append(full)
        return self.cluster.create_database(full)

    def restart(self) -> None:
        """A fast restart: clients are disconnected; same port, same data."""
        self.cluster.restart()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (`immediate` for a crash); start() brings it back."""
        self.cluster.stop(mode)

    def start(self) -> None:
        self.cluster.start()

    def sql(self, statement: str) -> str:
        """One statement in this test's database, for checks; rows as psql -At shows them."""
        return self.cluster.sql(statement, self.dbname)

    def cleanup(self) -> None:
        if not self.cluster.running():
            self.cluster.start()
        for name in [*self._extra, self.dbname]:
            self.cluster.drop_database(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresCluster]:
    """The session's PostgreSQL 15 server (skipped where it is not installed, except in CI)."""
    try:
        cluster = PostgresCluster.start_temporary(durable=False)
    except PostgresUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the PostgreSQL tests, but {e}")
        pytest.skip(str(e))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def postgres(
    postgres_server: PostgresCluster, request: pytest.FixtureRequest
) -> Iterator[Postgres]:
    """A fresh, empty database for this test on the session's server."""
    name = _database_name(request.node.name)
    postgres_server.create_database(name)
    handle = Postgres(postgres_server, name)
    try:
        yield handle
    finally:
        handle.cleanup()
