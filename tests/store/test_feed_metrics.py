"""The change feed's listener in the metrics: how often it lost its connection and
connected again, and whether it is connected now.

Two Registry objects on one real PostgreSQL database, as two nodes open it. The
listener's own session is ended from the server side (pg_terminate_backend, as an
administrator or a failover would), so the loss is a real one: the listener notices,
backs off, connects again and catches up. The counts are read as Prometheus renders
them, from the daemon's Metrics object (its HTTP endpoint is the daemon's test,
tests/integration/test_feed_metrics.py).
"""

from __future__ import annotations

import re

import psycopg
from prometheus_client import generate_latest

from tests.postgres import Postgres
from tests.store.test_feed import ADMIN, DAY, NOW, nodes, wait_for
from vibectld.ops.metrics import Metrics
from vibectld.store import feed
from vibectld.store.registry import Registry

__all__ = ["nodes"]  # the fixture (two stores on one database), used by name

# The listeners' sessions: the last statement each ran is the catch-up read, every 0.5 s.
_LISTENERS = (
    "SELECT pid FROM pg_stat_activity "
    "WHERE datname = current_database() AND pid <> pg_backend_pid() AND query LIKE %s"
)


def _scrape(metrics: Metrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {
        name: float(value)
        for name, value in re.findall(r"^(vibectld_feed_\w+) (\S+)$", text, re.MULTILINE)
    }


def terminate_listeners(dsn: str, listeners: int) -> None:
    """End the sessions of the `listeners` change feed listeners on the database at once
    (also the daemon's test, tests/integration/test_feed_metrics.py). A listener whose
    last statement was another read (the changed clients' rows) shows the catch-up read
    again within 0.5 s."""
    like = feed.SINCE_SQL.split("?")[0] + "%"
    with psycopg.connect(dsn, autocommit=True) as conn:
        pids: list[int] = []

        def all_seen() -> bool:
            pids[:] = [row[0] for row in conn.execute(_LISTENERS, (like,)).fetchall()]
            return len(pids) == listeners

        wait_for(all_seen, timeout=2.0)
        conn.execute("SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", (pids,))


def test_a_lost_listener_connection_is_counted_and_the_feed_still_delivers(
    nodes: tuple[Registry, Registry], postgres: Postgres
) -> None:
    a, b = nodes
    metrics = Metrics()
    metrics.watch_feed(b.feed_listener)
    wait_for(lambda: _scrape(metrics)["vibectld_feed_connected"] == 1.0)
    assert _scrape(metrics) == {
        "vibectld_feed_failures_total": 0.0,
        "vibectld_feed_reconnects_total": 0.0,
        "vibectld_feed_reloads_total": 0.0,
        "vibectld_feed_connected": 1.0,
    }

    # Both nodes' listeners: their sessions are alike, and a's loss is a's own business.
    terminate_listeners(postgres.dsn, 2)
    wait_for(lambda: _scrape(metrics)["vibectld_feed_reconnects_total"] == 1.0)
    after = _scrape(metrics)
    assert after["vibectld_feed_failures_total"] == 1.0
    assert after["vibectld_feed_connected"] == 1.0
    # The view is fresh again: the time since the last catch-up (the storage gauge
    # vibectld_storage_view_age_seconds) is back under the catch-up period.
    wait_for(lambda: (b.freshness() or 0.0) < 1.0)

    # Connected again means listening again: a change made now reaches b at once.
    alice = a.issue(name="alice", expires_at=NOW + 90 * DAY, issued_by=ADMIN, now=NOW)
    wait_for(lambda: b.get(alice.id) is not None, timeout=2.0)

    # A second loss counts again.
    terminate_listeners(postgres.dsn, 2)
    wait_for(lambda: _scrape(metrics)["vibectld_feed_reconnects_total"] == 2.0)
    assert _scrape(metrics)["vibectld_feed_failures_total"] == 2.0


def test_the_listener_is_counted_as_disconnected_while_the_database_is_down(
    nodes: tuple[Registry, Registry], postgres: Postgres
) -> None:
    _, b = nodes
    metrics = Metrics()
    metrics.watch_feed(b.feed_listener)
    wait_for(lambda: _scrape(metrics)["vibectld_feed_connected"] == 1.0)
    postgres.stop()
    try:
        wait_for(lambda: _scrape(metrics)["vibectld_feed_connected"] == 0.0)
        # Each attempt while the server is away fails and is counted; none reconnects.
        wait_for(lambda: _scrape(metrics)["vibectld_feed_failures_total"] >= 3.0)
        assert _scrape(metrics)["vibectld_feed_reconnects_total"] == 0.0
    finally:
        postgres.start()
    wait_for(lambda: _scrape(metrics)["vibectld_feed_connected"] == 1.0, timeout=10.0)
    assert _scrape(metrics)["vibectld_feed_reconnects_total"] == 1.0


def test_no_feed_metrics_without_a_listener() -> None:
    # sqlite: no other node writes the store, so no feed and no "disconnected" to alarm on.
    assert _scrape(Metrics()) == {}
