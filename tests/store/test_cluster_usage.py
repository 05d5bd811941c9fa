"""Budgets count every node's calls: two Registry objects on one real PostgreSQL database.

Each node counts its own calls in memory at once; after each flush it reads the day's
and the month's totals back from the database, where every node's flushes add up. So a
call served on one node counts in the other's `tokens_used`, `usd_spent_month` and
`usd_spent_day` once the first node has flushed it and the second has flushed since.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.postgres import Postgres
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import ClientRecord, Registry

NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
DAY = 86400
ADMIN = "root(0)"
EARLIER_THIS_MONTH = NOW - 10 * DAY  # 2027-01-05
LAST_MONTH = NOW - 20 * DAY  # 2026-12-26


@pytest.fixture
def nodes(postgres: Postgres) -> Iterator[tuple[Registry, Registry]]:
    a = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    b = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    yield a, b
    a.close()
    b.close()


def _call(store: Registry, client: ClientRecord, tokens: int, cost: float, now: int = NOW) -> None:
    store.record_call(
        client.id, now=now, error=False, input_tokens=tokens, output_tokens=0, cost_usd=cost
    )


def _alice(a: Registry, b: Registry) -> ClientRecord:
    alice = a.issue(name="alice", expires_at=NOW + 90 * DAY, issued_by=ADMIN, now=NOW)
    b.update(alice.id, by=ADMIN, note="seen", now=NOW)  # b knows alice, feed or not
    return alice


def test_calls_on_one_node_count_in_the_others_budgets_after_both_flush(
    nodes: tuple[Registry, Registry],
) -> None:
    a, b = nodes
    alice = _alice(a, b)
    _call(a, alice, 100, 1.0)
    _call(a, alice, 50, 0.5)
    assert b.tokens_used(alice.id, NOW) == 0  # a has not flushed
    a.flush()
    assert b.tokens_used(alice.id, NOW) == 0  # b has not read the totals back since
    b.flush()
    assert b.tokens_used(alice.id, NOW) == 150
    assert b.usd_spent_month(alice.id, NOW) == pytest.approx(1.5)
    assert b.usd_spent_day(NOW) == pytest.approx(1.5)

    # b's own calls count at once, flushed or not, on top of the database's totals.
    _call(b, alice, 7, 0.25)
    assert b.tokens_used(alice.id, NOW) == 157
    b.flush()
    _call(b, alice, 3, 0.25)
    assert b.tokens_used(alice.id, NOW) == 160
    assert b.usd_spent_day(NOW) == pytest.approx(2.0)
    assert b.usd_spent_month(alice.id, NOW) == pytest.approx(2.0)
    # a: its own calls, plus b's flushed one (b's last is not flushed yet).
    a.flush()
    assert a.tokens_used(alice.id, NOW) == 157
    assert a.usd_spent_day(NOW) == pytest.approx(1.75)
    b.flush()
    a.flush()
    assert a.tokens_used(alice.id, NOW) == b.tokens_used(alice.id, NOW) == 160
    top = a.top_today(NOW)
    assert [(row.client_id, row.requests) for row in top] == [(alice.id, 4)]


def test_the_months_dollars_count_earlier_days_and_not_last_month(
    nodes: tuple[Registry, Registry],
) -> None:
    a, b = nodes
    alice = _alice(a, b)
    bob = a.issue(name="bob", expires_at=NOW + 90 * DAY, issued_by=ADMIN, now=NOW)
    _call(a, alice, 1, 2.0, now=EARLIER_THIS_MONTH)
    _call(a, alice, 1, 4.0, now=LAST_MONTH)
    _call(a, bob, 1, 0.5)
    a.flush()
    _call(b, alice, 1, 1.0)
    b.flush()
    assert b.usd_spent_month(alice.id, NOW) == pytest.approx(3.0)
    assert b.usd_spent_month(bob.id, NOW) == pytest.approx(0.5)
    assert b.usd_spent_day(NOW) == pytest.approx(1.5)
    assert b.tokens_used(alice.id, NOW) == 1  # today's only


def test_a_failed_flush_keeps_the_counts_and_reads_nothing_back(
    nodes: tuple[Registry, Registry], postgres: Postgres
) -> None:
    a, b = nodes
    alice = _alice(a, b)
    _call(b, alice, 10, 0.1)
    _call(a, alice, 5, 0.1)
    a.flush()
    postgres.stop()
    try:
        with pytest.raises(Exception, match="client registry"):
            b.flush()
        assert b.tokens_used(alice.id, NOW) == 10  # its own, as before
    finally:
        postgres.start()
    b.flush()
    assert b.tokens_used(alice.id, NOW) == 15
    a.flush()
    assert a.tokens_used(alice.id, NOW) == 15
    [row] = a.usage(since_day="2027-01-15")
    assert (row.requests, row.input_tokens) == (2, 15)
