"""PostgreSQL's own part of the store: its schema lock, its connection string, reconnection,
and several nodes writing one database.

What every backend must do is the contract suite, which runs on PostgreSQL too; this is
what only a shared, networked database has. The change feed that brings another node's
change into memory without a write has its own tests (test_feed.py); here the feed is
stopped where a test needs a node that has not heard of a change yet, to show that its
own writes decide on the database's rows regardless.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from tests.postgres import Postgres
from vibectld.store import postgresql, postgresql_schema
from vibectld.store.base import NodeInfo
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import (
    AlreadyRevoked,
    ClientRecord,
    DuplicateClient,
    Registry,
    RegistryError,
    StorageFailure,
)

NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
DAY = 86400
ADMIN = "root(0)"
TODAY = "2027-01-15"


@pytest.fixture
def nodes(postgres: Postgres) -> Iterator[tuple[Registry, Registry]]:
    """Two stores on one database, as two vibectld nodes would open it."""
    a = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    b = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    yield a, b
    a.close()
    b.close()


# One node's start, in a process of its own: the connection string comes through the
# environment (never a command line, which `ps` shows).
_OPEN_AND_CLOSE = """
import os
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import Registry
Registry.load(PostgreSQLDatabase.open(os.environ["VIBECTLD_TEST_DSN"])).close()
"""


def test_nodes_starting_together_on_an_empty_database_create_one_schema(
    postgres: Postgres,
) -> None:
    # Processes, as nodes are: each has its own connection and races the others for the
    # schema; the advisory lock makes them take turns.
    env = {**os.environ, "VIBECTLD_TEST_DSN": postgres.dsn}
    starts = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AND_CLOSE], env=env, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    for start in starts:
        _, err = start.communicate(timeout=60)
        assert start.returncode == 0, err
    assert postgres.sql("SELECT MAX(version), COUNT(*) FROM vibectld_schema") == (
        f"{postgresql_schema.SCHEMA_VERSION}|{postgresql_schema.SCHEMA_VERSION}"
    )
    tables = postgres.sql(
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
        "WHERE schemaname = 'public'"
    )
    assert tables == (
        "audit,changes,clients,cluster_secrets,lease_holders,leases,nodes,rate_counts,rate_events,"
        "redactions,"
        "signing_keys,usage,usage_journals,vibectld_schema"
    )


def test_a_newer_schema_is_refused(postgres: Postgres) -> None:
    PostgreSQLDatabase.open(postgres.dsn).close()
    postgres.sql(
        f"INSERT INTO vibectld_schema VALUES ({postgresql_schema.SCHEMA_VERSION + 1}, 0)"  # noqa: S608
    )
    with pytest.raises(RegistryError, match="newer than this vibectld knows"):
        PostgreSQLDatabase.open(postgres.dsn)


def test_the_connection_string_never_appears_in_a_message(postgres: Postgres) -> None:
    password = postgres.cluster.password
    with pytest.raises(StorageFailure) as bad:
        PostgreSQLDatabase.open(f"host=127.0.0.1 password={password} nonsense")
    assert "not a libpq connection string" in str(bad.value)
    assert password not in str(bad.value)

    dead = make_conninfo(postgres.dsn, port=1)
    with pytest.raises(StorageFailure) as refused:
        PostgreSQLDatabase.open(dead)
    message = str(refused.value)
    assert message.startswith(
        f"cannot reach the client registry, the PostgreSQL database {postgres.dbname!r}"
    )
    assert "127.0.0.1:1" in message and "is running" in message
    assert password not in message

    db = PostgreSQLDatabase.open(postgres.dsn)
    try:
        assert password not in repr(db) and password not in db.where
    finally:
        db.close()


def test_commits_are_durable_whatever_the_database_default(postgres: Postgres) -> None:
    postgres.sql(f"ALTER DATABASE {postgres.dbname} SET synchronous_commit = off")
    db = PostgreSQLDatabase.open(postgres.dsn)
    try:
        assert db.query("SHOW synchronous_commit") == [("on",)]
    finally:
        db.close()


def test_a_restarted_server_is_reconnected_without_a_failed_operation(
    postgres: Postgres,
) -> None:
    registry = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    try:
        registry.issue(name="alice", expires_at=NOW + DAY, issued_by=ADMIN, now=NOW)
        postgres.restart()
        # At once: the write meets the broken connection before anything is committed,
        # so it runs again on a new one.
        registry.issue(name="bob", expires_at=NOW + DAY, issued_by=ADMIN, now=NOW)
        postgres.restart()
        assert registry.usage(since_day=TODAY) == []  # a read, likewise
        postgres.restart()
        # After a pause: an idle connection is checked before it is used.
        time.sleep(postgresql.IDLE_CHECK_SECONDS + 0.1)
        registry.issue(name="carol", expires_at=NOW + DAY, issued_by=ADMIN, now=NOW)
        assert registry.health().degraded is False
        assert len(registry.clients(now=NOW)) == 3
        other = Registry.load(PostgreSQLDatabase.open(postgres.dsn))
        assert len(other.clients(now=NOW)) == 3
        other.close()
    finally:
        registry.close()


# -- two nodes, one database -------------------------------------------------------------


def _deaf(store: Registry) -> Registry:
    """`store` with its change feed stopped: it hears of other nodes' changes only when
    one of its own writes meets them."""
    assert store._listener is not None
    store._listener.stop()
    return store


def _issue(store: Registry, name: str) -> ClientRecord:
    return store.issue(name=name, expires_at=NOW + 90 * DAY, issued_by=ADMIN, now=NOW)


def test_a_client_issued_on_one_node_is_revoked_on_another(
    nodes: tuple[Registry, Registry],
) -> None:
    a, b = map(_deaf, nodes)
    heard_on_a: list[ClientRecord] = []
    a.on_change(heard_on_a.append)
    alice = _issue(a, "alice")
    # b loaded before alice existed (and hears no feed); its write looks in the database.
    assert b.get(alice.id) is None
    revoked = b.revoke("alice", by=ADMIN, reason="left", now=NOW + 5)
    assert (revoked.id, revoked.revoked_at) == (alice.id, NOW + 5)
    assert b.get(alice.id) == revoked
    # a still holds alice as active until something brings the change; its own revoke
    # meets the database's row, takes it in, and tells its callbacks.
    assert a.get(alice.id) == alice
    with pytest.raises(AlreadyRevoked, match="already revoked by root"):
        a.revoke(alice.id, by="ops(1000)", now=NOW + 6)
    assert a.get(alice.id) == revoked
    assert heard_on_a == [revoked]


def test_an_active_name_is_refused_on_every_node(nodes: tuple[Registry, Registry]) -> None:
    a, b = map(_deaf, nodes)
    heard_on_b: list[ClientRecord] = []
    b.on_change(heard_on_b.append)
    alice = _issue(a, "alice")
    with pytest.raises(DuplicateClient, match=alice.id):
        _issue(b, "alice")
    assert heard_on_b == [alice] and b.get(alice.id) == alice
    a.revoke("alice", by=ADMIN, now=NOW + 1)
    assert _issue(b, "alice").id != alice.id  # b finds the revocation in the database


def test_updates_on_two_nodes_keep_each_others_fields(nodes: tuple[Registry, Registry]) -> None:
    a, b = nodes
    alice = _issue(a, "alice")
    a.update("alice", by=ADMIN, rpm=5, now=NOW + 1)
    got = b.update(alice.id, by=ADMIN, note="laptop", now=NOW + 2)
    assert (got.rpm, got.note) == (5, "laptop")
    fresh = Registry.load(PostgreSQLDatabase.open(_dsn(a)), now=NOW)
    try:
        assert fresh.get(alice.id) == got
    finally:
        fresh.close()


def test_usage_from_every_node_adds_up(nodes: tuple[Registry, Registry]) -> None:
    a, b = map(_deaf, nodes)
    alice = _issue(a, "alice")
    assert b.get(alice.id) is None
    b.update(alice.id, by=ADMIN, rpm=9, now=NOW + 1)  # b learns alice through a write
    for store, calls in ((a, 2), (b, 3)):
        for i in range(calls):
            store.record_call(
                alice.id,
                now=NOW + 10 + i,
                error=False,
                input_tokens=1,
                output_tokens=1,
                cost_usd=0.5,
            )
        store.flush()
    for store in (a, b):
        [row] = store.usage(since_day=TODAY)
        assert (row.requests, row.input_tokens, row.cost_usd) == (5, 5, 2.5)
    fresh = Registry.load(PostgreSQLDatabase.open(_dsn(a)), now=NOW)
    try:
        got = fresh.get(alice.id)
        assert got is not None and (got.requests, got.last_seen_at) == (5, NOW + 12)
        assert fresh.tokens_used(alice.id, NOW) == 10
        assert fresh.usd_spent_month(alice.id, NOW) == 2.5
    finally:
        fresh.close()


def test_every_nodes_heartbeat_is_listed(nodes: tuple[Registry, Registry]) -> None:
    a, b = nodes
    node_a = NodeInfo("a", "10.0.0.1:50051", "1.0", 1, NOW, NOW + 1)
    node_b = NodeInfo("b", "10.0.0.2:50051", "1.0", 0, NOW, NOW + 2)
    a.heartbeat(node_a)
    assert a.nodes() == [node_a]
    b.heartbeat(node_b)
    assert b.nodes() == [node_a, node_b]
    a.heartbeat(node_a)
    assert a.nodes() == [node_a, node_b]


def _dsn(store: Registry) -> str:
    db = store._db
    assert isinstance(db, PostgreSQLDatabase)
    return db._conninfo


def test_the_schema_takes_what_sqlite_holds(postgres: Postgres) -> None:
    """Types wide enough for every value SQLite stores: 64-bit counts, 8-byte dollars."""
    registry = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    try:
        rec = registry.issue(
            name="big", expires_at=2**62, issued_by=ADMIN, usd_per_month=0.1 + 0.2, now=NOW
        )
        registry.record_call(
            rec.id, now=NOW, error=False, input_tokens=2**40, output_tokens=1, cost_usd=1e-9
        )
        registry.flush()
    finally:
        registry.close()
    with psycopg.connect(postgres.dsn) as conn:
        row = conn.execute("SELECT expires_at, usd_per_month FROM clients").fetchone()
        assert row == (2**62, 0.1 + 0.2)
        usage = conn.execute("SELECT input_tokens, cost_usd FROM usage").fetchone()
        assert usage == (2**40, 1e-9)
