"""The change feed between nodes: two Registry objects on one real PostgreSQL database,
as two vibectld nodes open it. What one node writes reaches the other's memory through
LISTEN/NOTIFY and the catch-up read, without any write on the second node; its
callbacks hear of it; a restarted or stopped server, and a gap pruned from the feed,
cost freshness for a while but never a change.
"""

from __future__ import annotations

import functools
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from tests.postgres import Postgres
from vibectld.store import feed, listener
from vibectld.store.base import NodeInfo, Transaction
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import ClientRecord, Registry

NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
DAY = 86400
ADMIN = "root(0)"


@pytest.fixture
def nodes(postgres: Postgres) -> Iterator[tuple[Registry, Registry]]:
    """Two stores on one database, as two vibectld nodes would open it."""
    a = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    b = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    yield a, b
    a.close()
    b.close()


def wait_for(condition: Callable[[], object], timeout: float = 5.0) -> float:
    """Poll `condition` every millisecond until it holds; the seconds it took."""
    start = time.perf_counter()
    while not condition():
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        time.sleep(0.001)
    return time.perf_counter() - start


def _issue(store: Registry, name: str) -> ClientRecord:
    return store.issue(name=name, expires_at=NOW + 90 * DAY, issued_by=ADMIN, now=NOW)


def _listener(store: Registry) -> listener.FeedListener:
    assert store._listener is not None
    return store._listener


def _caught_up(store: Registry, other: Registry) -> Callable[[], bool]:
    """Whether `store`'s listener has passed every change `other` can see."""
    top = int(other.transact(lambda tx: tx.select(feed.LAST_ID_SQL))[0][0])
    return lambda: _listener(store).last >= top


def test_an_issue_and_an_update_reach_the_other_node_and_its_callbacks(
    nodes: tuple[Registry, Registry],
) -> None:
    a, b = nodes
    heard_on_a: list[ClientRecord] = []
    heard_on_b: list[ClientRecord] = []
    a.on_change(heard_on_a.append)
    b.on_change(heard_on_b.append)
    alice = _issue(a, "alice")
    wait_for(lambda: b.get(alice.id) == alice, timeout=1.0)
    assert heard_on_b == [alice]
    updated = a.update("alice", by=ADMIN, rpm=7, note="laptop", now=NOW + 1)
    wait_for(lambda: b.get(alice.id) == updated, timeout=1.0)
    assert heard_on_b == [alice, updated]
    assert b.find("alice").rpm == 7
    # a's own changes come back through its feed too: taken in, not announced.
    wait_for(_caught_up(a, a))
    assert heard_on_a == []
    assert a.get(alice.id) == updated


def test_revocation_reaches_the_other_node_within_a_second_under_load(
    nodes: tuple[Registry, Registry],
) -> None:
    a, b = nodes
    clients = [_issue(a, f"c{i}") for i in range(50)]
    wait_for(lambda: all(b.get(c.id) is not None for c in clients))
    heard: dict[str, float] = {}

    def hear(record: ClientRecord) -> None:
        heard.setdefault(record.id, time.perf_counter())

    b.on_change(hear)

    # Load on both nodes while revoking: usage counted and flushed on each (the flush
    # shares the registry's connection and lock, the feed does not), and another
    # client's limits updated on a in a loop, which keeps the feed busy.
    busy = _issue(a, "busy")
    wait_for(lambda: b.get(busy.id) is not None)
    stop = threading.Event()

    def count_and_flush(store: Registry) -> None:
        while not stop.is_set():
            for _ in range(50):
                store.record_call(
                    busy.id, now=NOW, error=False, input_tokens=5, output_tokens=5, cost_usd=0.01
                )
            store.flush()

    def update_busy() -> None:
        rpm = 1
        while not stop.is_set():
            rpm = rpm % 1000 + 1
            a.update(busy.id, by=ADMIN, rpm=rpm, now=NOW)

    load = [
        threading.Thread(target=count_and_flush, args=(a,)),
        threading.Thread(target=count_and_flush, args=(b,)),
        threading.Thread(target=update_busy),
    ]
    for thread in load:
        thread.start()
    # From the start of revoke() on a to the secret refused on b, and from its return
    # (the commit acknowledged) to the same.
    from_call, from_commit = [], []
    try:
        for client in clients:
            start = time.perf_counter()
            a.revoke(client.id, by=ADMIN, reason="test", now=NOW + 1)
            committed = time.perf_counter()
            wait_for(functools.partial(_revoked, b, client), timeout=5.0)
            seen = time.perf_counter()
            from_call.append(seen - start)
            from_commit.append(seen - committed)
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in load:
            thread.join()
    assert set(heard) >= {c.id for c in clients}
    p50, p99 = _report("from revoke() on a", from_call)
    _report("from its commit", from_commit)
    assert p99 < 1.0
    # The notification wakes the listener: no waiting for the periodic read.
    assert p50 < listener.CATCH_UP_SECONDS / 2


def _revoked(store: Registry, client: ClientRecord) -> bool:
    record = store.get(client.id)
    return record is not None and record.revoked_at is not None


def _report(what: str, latencies: list[float]) -> tuple[float, float]:
    """Print p50/p99/max in ms; return p50 and p99 in seconds."""
    ordered = sorted(latencies)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    print(
        f"\nrevocation seen on b, {what}, {len(ordered)} under load: "
        f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )
    return p50, p99


def test_a_signing_key_change_reaches_on_key_change_on_every_node(
    nodes: tuple[Registry, Registry],
) -> None:
    a, b = nodes
    kids_on_a: list[str] = []
    kids_on_b: list[str] = []
    a.on_key_change(kids_on_a.append)
    b.on_key_change(kids_on_b.append)

    def rotate(tx: Transaction) -> None:
        feed.record_change(tx, feed.SIGNING_KEY, "k-2027-01-15", NOW)

    a.transact(rotate)
    wait_for(lambda: kids_on_b == ["k-2027-01-15"], timeout=1.0)
    # The writer hears of its own key change too (the callback's reload is idempotent).
    wait_for(lambda: kids_on_a == ["k-2027-01-15"], timeout=1.0)


def test_the_listener_reconnects_after_a_restart_and_catches_up(
    nodes: tuple[Registry, Registry], postgres: Postgres
) -> None:
    a, b = nodes
    alice = _issue(a, "alice")
    wait_for(lambda: b.get(alice.id) is not None)
    heard: list[ClientRecord] = []
    b.on_change(heard.append)
    before = _listener(b).reconnects
    postgres.stop()
    time.sleep(1.0)  # b's listener fails and backs off
    postgres.start()
    # Written at once, while b's listener is still backing off: no notification reaches
    # it, and the catch-up read after it reconnects brings both changes.
    revoked = a.revoke("alice", by=ADMIN, now=NOW + 1)
    bob = _issue(a, "bob")
    took = wait_for(lambda: b.get(bob.id) is not None and b.get(alice.id) == revoked)
    assert _listener(b).reconnects > before
    assert {r.id for r in heard} == {alice.id, bob.id}
    print(f"\ncaught up {took:.2f} s after the server came back")
    postgres.restart()  # a fast restart cuts the listener's connection as well
    carol = _issue(a, "carol")
    wait_for(lambda: b.get(carol.id) is not None)


def test_freshness_grows_while_the_database_is_down_and_recovers(
    nodes: tuple[Registry, Registry], postgres: Postgres
) -> None:
    _, b = nodes
    wait_for(lambda: (b.freshness() or 0.0) < listener.CATCH_UP_SECONDS + 0.2)
    postgres.stop()
    try:
        time.sleep(2.0)
        age = b.freshness()
        assert age is not None and age > 1.5
    finally:
        postgres.start()
    took = wait_for(lambda: (b.freshness() or 99.0) < 1.0, timeout=10.0)
    print(f"\nfresh again {took:.2f} s after the server came back")


def test_a_gap_pruned_from_the_feed_reloads_every_client(
    nodes: tuple[Registry, Registry],
) -> None:
    a, b = nodes
    alice = _issue(a, "alice")
    wait_for(lambda: b.get(alice.id) is not None)
    heard: list[ClientRecord] = []
    b.on_change(heard.append)
    # b is away (its listener stopped) while a revokes alice and issues two more, two
    # days ago by the changes' times, and a's heartbeat prunes the feed: only the newest
    # row is left.
    away = _listener(b)
    away.stop()
    last = away.last
    then = int(time.time()) - 2 * DAY
    revoked = a.revoke("alice", by=ADMIN, now=then)
    bob, carol = (
        a.issue(name=name, expires_at=NOW + DAY, issued_by=ADMIN, now=then)
        for name in ("bob", "carol")
    )
    a.heartbeat(NodeInfo("a", "127.0.0.1:1", "1", 0, then, int(time.time())))
    assert a.transact(lambda tx: tx.select("SELECT COUNT(*) FROM changes"))[0][0] == 1
    b._follow_feed(last)
    wait_for(lambda: _listener(b).reloads == 1)
    assert b.get(alice.id) == revoked
    assert b.get(bob.id) == bob and b.get(carol.id) == carol
    assert {r.id for r in heard} == {alice.id, bob.id, carol.id}


def test_pruning_keeps_the_last_day_and_the_newest_older_row(
    nodes: tuple[Registry, Registry],
) -> None:
    a, _ = nodes
    now = int(time.time())
    old = [
        a.issue(name=f"o{i}", expires_at=NOW + DAY, issued_by=ADMIN, now=now - 2 * DAY)
        for i in range(3)
    ]
    recent = _issue(a, "recent")  # at NOW, which is later than a day ago

    def ids() -> list[tuple[str, ...]]:
        return a.transact(lambda tx: tx.select("SELECT key FROM changes ORDER BY id"))

    assert [key for (key,) in ids()] == [*(c.id for c in old), recent.id]
    a.heartbeat(NodeInfo("a", "127.0.0.1:1", "1", 0, now, now))
    assert [key for (key,) in ids()] == [old[-1].id, recent.id]


def test_a_hole_in_the_ids_is_not_a_gap(nodes: tuple[Registry, Registry]) -> None:
    a, b = nodes

    def rolled_back(tx: Transaction) -> None:
        feed.record_change(tx, feed.CLIENT, "nobody", NOW)
        raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        a.transact(rolled_back)  # takes an id that never commits
    alice = _issue(a, "alice")
    wait_for(lambda: b.get(alice.id) is not None)
    assert _listener(b).reloads == 0


def test_what_missed_counts_as_a_gap() -> None:
    now = NOW + 2 * DAY
    assert not feed.missed(10, 11, (1, NOW), now)
    assert not feed.missed(10, 13, (5, NOW), now)  # 11 and 12 rolled back
    assert feed.missed(10, 13, (13, NOW), now)  # 11 and 12 may have been pruned
    # The first rows of a young feed, after a rolled-back id: nothing was pruned.
    assert not feed.missed(0, 2, (2, now - 5), now)
    assert not feed.missed(0, 1, (1, NOW), now)


def test_heartbeats_forget_nodes_silent_for_a_day(nodes: tuple[Registry, Registry]) -> None:
    a, b = nodes
    a.heartbeat(NodeInfo("old", "10.0.0.1:50051", "1", 0, NOW, NOW))
    b.heartbeat(NodeInfo("b", "10.0.0.2:50051", "1", 0, NOW, NOW + DAY - 1))
    assert [n.name for n in b.nodes()] == ["b", "old"]
    b.heartbeat(NodeInfo("b", "10.0.0.2:50051", "1", 0, NOW, NOW + DAY + 1))
    assert [n.name for n in b.nodes()] == ["b"]


def test_close_stops_the_listener(postgres: Postgres) -> None:
    store = Registry.load(PostgreSQLDatabase.open(postgres.dsn), now=NOW)
    thread = _listener(store)._thread
    assert thread.is_alive()
    start = time.perf_counter()
    store.close()
    assert not thread.is_alive()
    assert time.perf_counter() - start < 2.0  # a wait slice, or a read in progress
    assert store.freshness() is not None
