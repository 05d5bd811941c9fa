"""Cluster-wide rpm and concurrency (service/cluster_limits.py) on a real PostgreSQL.

Three limiters on one database stand for three nodes: each has its own connections, its
own node name and its own in-memory Limiter (the fallback), as three daemons would. The
calls are spread over them round robin, as a load balancer would spread them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.postgres import Postgres
from vibectld.ops.metrics import Metrics
from vibectld.service import cluster_limits
from vibectld.service.cluster_limits import ClusterLimiter, Lease
from vibectld.service.limits import Limiter
from vibectld.service.refusals import LimitExceeded
from vibectld.store.base import NodeInfo
from vibectld.store.postgresql import PostgreSQLDatabase


class Node:
    """One node's limiter, with the store's signs (stale, live nodes) set by the test."""

    def __init__(self, db: PostgreSQLDatabase, name: str, live: int = 3) -> None:
        self.stale = False
        self.live = live
        self.metrics = Metrics()
        self.limiter = ClusterLimiter(
            db.conninfo,
            name,
            Limiter(),
            lambda: self.stale,
            self._nodes,
            self.metrics,
            db.clean,
        )
        self.limiter.name.claim(cluster_limits.LEASE_TIMEOUT)

    def _nodes(self) -> list[NodeInfo]:
        now = int(time.time())
        return [NodeInfo(f"n{i}", "", "", 0, now, now) for i in range(self.live)]

    def fallbacks(self) -> float:
        return sum(
            self.metrics.registry.get_sample_value(
                "vibectld_limit_fallbacks_total", {"reason": reason}
            )
            or 0.0
            for reason in ("stale", "unavailable")
        )

    def round_trips(self, step: str, result: str = "ok") -> float:
        return (
            self.metrics.registry.get_sample_value(
                "vibectld_limit_round_trips_total", {"step": step, "result": result}
            )
            or 0.0
        )


@pytest.fixture
def db(postgres: Postgres) -> Iterator[PostgreSQLDatabase]:
    database = PostgreSQLDatabase.open(postgres.dsn)  # the schema, with the functions
    yield database
    database.close()


def run(test: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(asyncio.wait_for(test(), 60))


async def started(*nodes: Node) -> None:
    for node in nodes:
        await node.limiter.tick()


async def closed(*nodes: Node) -> None:
    for node in nodes:
        await node.limiter.close()


async def died_quietly(node: Node) -> None:
    """Its connections closed, as a killed process's are, and nothing else."""
    await node.limiter._pool.close()


async def outcome(step: Awaitable[Any]) -> str:
    try:
        await step
    except LimitExceeded as refusal:
        assert refusal.retry_after_ms > 0
        return refusal.limit_type
    return "ok"


def test_rpm_5_means_5_of_12_across_three_nodes(db: PostgreSQLDatabase) -> None:
    nodes = [Node(db, name) for name in ("a", "b", "c")]

    async def test() -> None:
        await started(*nodes)
        # Rapid and concurrent: four at a time on each node.
        results = await asyncio.gather(
            *(outcome(nodes[i % 3].limiter.count_request("client-1", 5)) for i in range(12))
        )
        assert results.count("ok") == 5
        assert results.count("rpm") == 7
        # Another client has its own window.
        assert await outcome(nodes[0].limiter.count_request("client-2", 5)) == "ok"
        try:
            await nodes[1].limiter.count_request("client-1", 5)
        except LimitExceeded as refusal:
            # The window's first call leaves it just under 60 s from now.
            assert 55_000 < refusal.retry_after_ms <= 60_000
            assert "5 requests per minute" in refusal.message
        else:
            pytest.fail("a sixth call was counted")
        assert sum(n.round_trips("admit") for n in nodes) == 14  # one per check
        assert sum(n.fallbacks() for n in nodes) == 0
        await closed(*nodes)

    run(test)


def test_concurrency_holds_across_nodes_and_comes_back_on_release(
    db: PostgreSQLDatabase, postgres: Postgres
) -> None:
    a, b, c = (Node(db, name) for name in ("a", "b", "c"))

    async def test() -> None:
        await started(a, b, c)
        first = await a.limiter.acquire("client-1", 2)
        await b.limiter.acquire("client-1", 2)
        with pytest.raises(LimitExceeded) as refused:
            await c.limiter.acquire("client-1", 2)
        assert refused.value.limit_type == "concurrency"
        assert "2 requests running (limit 2)" in refused.value.message
        assert postgres.sql("SELECT count(*) FROM leases") == "2"  # a refusal takes nothing
        # Released off the response path: the row goes on the loop's next turns.
        a.limiter.release(first)
        await until(lambda: postgres.sql("SELECT count(*) FROM leases") == "1")
        third = await c.limiter.acquire("client-1", 2)
        assert third.id is not None
        assert a.round_trips("release") == 1  # on its own: no call of a's came by
        # A call's round trip carries the releases queued before it: no round trip more.
        c.limiter.release(third)
        await c.limiter.count_request("client-2", 10)
        assert postgres.sql("SELECT count(*) FROM leases") == "1"
        assert c.round_trips("release") == 0
        await closed(a, b, c)
        # A clean stop takes a node's leases and its mark with it.
        assert postgres.sql("SELECT count(*) FROM leases") == "0"
        assert postgres.sql("SELECT count(*) FROM lease_holders") == "0"

    run(test)


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> float:
    """Wait until `condition` holds; the seconds it took."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < seconds, "condition not met in time"
        await asyncio.sleep(0.05)
    return time.monotonic() - began


def test_a_silent_nodes_leases_stop_counting_within_10_s(db: PostgreSQLDatabase) -> None:
    a, b = Node(db, "a"), Node(db, "b")

    async def test() -> None:
        await started(a, b)
        await a.limiter.acquire("client-1", 2)
        await a.limiter.acquire("client-1", 2)
        # Node a dies holding both (no release, no more ticks); b keeps ticking.
        died = time.monotonic()
        ticking = asyncio.create_task(b.limiter.run())
        admitted: list[Lease] = []

        async def try_once() -> bool:
            try:
                admitted.append(await b.limiter.acquire("client-1", 2))
            except LimitExceeded:
                return False
            return True

        while not await try_once():
            assert time.monotonic() - died < 10, "a dead node's slots did not come back"
            await asyncio.sleep(0.2)
        waited = time.monotonic() - died
        # Not before its last tick is LEASE_TIMEOUT old, and within the contract's 10 s.
        assert cluster_limits.LEASE_TIMEOUT - 2 < waited < 10
        ticking.cancel()
        await asyncio.gather(ticking, return_exceptions=True)
        await died_quietly(a)

    run(test)


def test_a_restarted_node_forgets_its_earlier_leases_and_ticks_drop_lost_ones(
    db: PostgreSQLDatabase, postgres: Postgres
) -> None:
    a = Node(db, "a")

    async def test() -> None:
        await started(a)
        await a.limiter.acquire("client-1", 5)
        # A lease this node does not hold (its release was lost), older than the grace.
        postgres.sql(
            "INSERT INTO leases VALUES ('lost', 'client-1', 'a', "
            "extract(epoch FROM clock_timestamp()) - 60)"
        )
        await a.limiter.tick()
        assert postgres.sql("SELECT count(*) FROM leases") == "1"
        # The process dies without closing; its next start deletes what it left.
        await died_quietly(a)
        Node(db, "a")
        assert postgres.sql("SELECT count(*) FROM leases") == "0"

    run(test)


def test_stale_store_falls_back_to_this_nodes_share_without_a_round_trip(
    db: PostgreSQLDatabase,
) -> None:
    a = Node(db, "a", live=3)

    async def test() -> None:
        await started(a)
        a.stale = True
        # rpm 7 on three live nodes: this node's share is 2.
        results = [await outcome(a.limiter.count_request("client-1", 7)) for _ in range(3)]
        assert results == ["ok", "ok", "rpm"]
        # concurrency 5: share 1.
        lease = await a.limiter.acquire("client-1", 5)
        assert lease.id is None
        assert await outcome(a.limiter.acquire("client-1", 5)) == "concurrency"
        a.limiter.release(lease)
        assert await outcome(a.limiter.acquire("client-1", 5)) == "ok"
        # A share is never 0: one live node or ten, limit 1 or 2.
        a.live = 10
        assert await outcome(a.limiter.count_request("client-2", 2)) == "ok"
        assert a.round_trips("admit") == 0
        await closed(a)

    run(test)


def test_database_down_never_refuses_by_itself_nor_blocks_long(
    db: PostgreSQLDatabase, postgres: Postgres
) -> None:
    a = Node(db, "a", live=2)

    async def test() -> None:
        await started(a)
        # Calls the database admitted count in this node's own window too.
        assert await outcome(a.limiter.count_request("client-1", 6)) == "ok"
        postgres.stop()
        try:
            slowest = 0.0
            results = []
            for _ in range(4):
                began = time.monotonic()
                results.append(await outcome(a.limiter.count_request("client-1", 6)))
                slowest = max(slowest, time.monotonic() - began)
            # Share 3 of 6 on two nodes, one of them already served.
            assert results == ["ok", "ok", "rpm", "rpm"]
            assert slowest < cluster_limits.ROUND_TRIP_TIMEOUT + 0.1
            began = time.monotonic()
            lease = await a.limiter.acquire("client-1", 4)
            assert time.monotonic() - began < cluster_limits.ROUND_TRIP_TIMEOUT + 0.1
            assert lease.id is None
            a.limiter.release(lease)
        finally:
            postgres.start()
        # Back without a restart: the next tick reconnects, and the database decides again.
        await asyncio.sleep(cluster_limits.BACKOFF_SECONDS)
        await until_ticked(a)
        lease = await a.limiter.acquire("client-1", 4)
        assert lease.id is not None
        await closed(a)

    run(test)


async def until_ticked(node: Node, seconds: float = 15.0) -> None:
    began = time.monotonic()
    while True:
        try:
            await node.limiter.tick()
            return
        except cluster_limits._Unavailable:
            assert time.monotonic() - began < seconds, "the limiter did not reconnect"
            await asyncio.sleep(0.2)


def test_a_slow_round_trip_is_not_waited_for_and_its_lease_is_still_released(
    db: PostgreSQLDatabase, postgres: Postgres
) -> None:
    a = Node(db, "a", live=1)

    async def test() -> None:
        await started(a)
        # Another session holds the client's lease lock: the take waits in the database.
        with psycopg.connect(postgres.dsn, autocommit=True) as blocker:
            blocker.execute(
                "SELECT pg_advisory_lock(hashtextextended('vibectld lease client-1', 0))"
            )
            began = time.monotonic()
            lease = await a.limiter.acquire("client-1", 3)
            assert time.monotonic() - began < cluster_limits.ROUND_TRIP_TIMEOUT + 0.1
            assert lease.id is None  # decided on this node's share
            assert a.round_trips("admit", "timeout") == 1
            # Its release is queued at once and runs now, before the take has committed:
            # it deletes nothing.
            await asyncio.sleep(0.2)
            blocker.execute(
                "SELECT pg_advisory_unlock(hashtextextended('vibectld lease client-1', 0))"
            )
        # The abandoned take commits once the lock is free, a lease no call holds: the
        # ticks delete it once it is older than the grace.
        await until(lambda: postgres.sql("SELECT count(*) FROM leases") == "1")
        began = time.monotonic()
        while postgres.sql("SELECT count(*) FROM leases") != "0":
            assert time.monotonic() - began < cluster_limits.LEASE_GRACE + 5
            await asyncio.sleep(0.5)
            await a.limiter.tick()
        a.limiter.release(lease)
        await closed(a)

    run(test)


def test_the_window_slides_by_the_databases_clock_and_empty_ones_are_swept(
    db: PostgreSQLDatabase, postgres: Postgres
) -> None:
    a = Node(db, "a")

    async def test() -> None:
        await started(a)
        for _ in range(3):
            await a.limiter.count_request("client-1", 3)
        # Age the events: 50 s, 50 s and 10 s old.
        postgres.sql(
            "UPDATE rate_events SET at = at - 50 WHERE at < (SELECT max(at) FROM rate_events)"
        )
        postgres.sql(
            "UPDATE rate_events SET at = at - 10 WHERE at = (SELECT max(at) FROM rate_events)"
        )
        with pytest.raises(LimitExceeded) as refused:
            await a.limiter.count_request("client-1", 3)
        # Room when the oldest of the three leaves: about 10 s from now.
        assert 9_000 < refused.value.retry_after_ms <= 10_000
        # A limit of 1: the newest decides (10 s old: room in about 50 s).
        with pytest.raises(LimitExceeded) as refused:
            await a.limiter.count_request("client-1", 1)
        assert 49_000 < refused.value.retry_after_ms <= 50_000
        postgres.sql(
            "UPDATE rate_events SET at = at - 15 WHERE at < (SELECT max(at) FROM rate_events)"
        )
        # Two left the window: two calls fit, the count kept beside the events agrees.
        await a.limiter.count_request("client-1", 3)
        await a.limiter.count_request("client-1", 3)
        assert await outcome(a.limiter.count_request("client-1", 3)) == "rpm"
        assert postgres.sql("SELECT n FROM rate_counts WHERE client_id = 'client-1'") == "3"
        # A window that empties: the sweep takes its events and its count.
        await a.limiter.count_request("client-2", 3)
        postgres.sql("UPDATE rate_events SET at = at - 61 WHERE client_id = 'client-2'")
        await a.limiter.tick(sweep=True)
        assert postgres.sql("SELECT count(*) FROM rate_events WHERE client_id = 'client-2'") == "0"
        assert postgres.sql("SELECT count(*) FROM rate_counts WHERE client_id = 'client-2'") == "0"
        assert postgres.sql("SELECT count(*) FROM rate_counts") == "1"
        await a.limiter.count_request("client-2", 1)
        await closed(a)

    run(test)
