"""How the cluster limiter should reach PostgreSQL from the event loop: measured.

    python -m bench.limiter_connections     # a temporary durable PostgreSQL 15

One operation, the round trip every call of a limited client makes when the store is
shared (`vibectld_admit`, service/cluster_limits.py), here its rpm step alone, over
clients c1..c1000 with rpm high enough that every call is counted (the insert path, the
common one). Two ways to run it, each with 1 and 4 connections, at 1 and 16 callers:

  async            psycopg's AsyncConnection on the event loop
  thread           psycopg's sync Connection, the call handed to a thread (run_in_executor)
  async (limiter)  what the daemon runs: ClusterLimiter.count_request, async connections

Each connection runs with synchronous_commit off, as the limiter's do (its rows are a
minute's worth of state; see cluster_limits.py). Reported: p50 and p99 µs per check,
checks per second, and this process's CPU µs per check (what the daemon pays).
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import psycopg

from bench.op_loop import closed_loop
from bench.postgres import PostgresCluster
from bench.result import median, percentile
from vibectld.ops.metrics import Metrics
from vibectld.service.cluster_limits import ClusterLimiter
from vibectld.service.limits import Limiter
from vibectld.store.postgresql import PostgreSQLDatabase

C = TypeVar("C")

CHECK = "SELECT retry_ms, running FROM vibectld_admit(%s, %s, NULL, 'bench', NULL, 6, '{}')"
RPM = 1_000_000_000
WARMUP, DURATION = 0.3, 2.0


class FairPool(Generic[C]):
    """Connections handed out first come, first served (asyncio.Queue is not: a caller
    that puts one back and asks again at once takes it ahead of those waiting)."""

    def __init__(self, conns: list[C]) -> None:
        self.idle: deque[C] = deque(conns)
        self.waiters: deque[asyncio.Future[C]] = deque()

    async def get(self) -> C:
        if self.idle:
            return self.idle.popleft()
        waiter: asyncio.Future[C] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def put(self, conn: C) -> None:
        if self.waiters:
            self.waiters.popleft().set_result(conn)
        else:
            self.idle.append(conn)


class LimiterWay:
    """The limiter's own path: ClusterLimiter.count_request (its pool, its task per
    round trip so that a slow one is never cancelled, its metrics)."""

    name = "async (limiter)"

    def __init__(self, limiter: ClusterLimiter) -> None:
        self.limiter = limiter

    async def check(self, client: str) -> None:
        await self.limiter.count_request(client, RPM)


class AsyncWay:
    name = "async"

    def __init__(self, conns: list[psycopg.AsyncConnection[Any]]) -> None:
        self.pool = FairPool(conns)

    async def check(self, client: str) -> None:
        conn = await self.pool.get()
        try:
            await conn.execute(CHECK, (client, RPM), prepare=True)
        finally:
            self.pool.put(conn)


class ThreadWay:
    name = "thread"

    def __init__(self, conns: list[psycopg.Connection[Any]]) -> None:
        self.pool = FairPool(conns)
        self.threads = ThreadPoolExecutor(len(conns))

    async def check(self, client: str) -> None:
        conn = await self.pool.get()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.threads, lambda: conn.execute(CHECK, (client, RPM), prepare=True)
            )
        finally:
            self.pool.put(conn)


async def run(dsn: str) -> None:
    print("| way | connections | callers | p50 µs | p99 µs | checks/s | client CPU µs |")
    print("|---|---|---|---|---|---|---|")
    for size in (1, 4):
        aconns = [await psycopg.AsyncConnection.connect(dsn, autocommit=True) for _ in range(size)]
        sconns = [psycopg.connect(dsn, autocommit=True) for _ in range(size)]
        for conn in aconns:
            await conn.execute("SET synchronous_commit = off")
        for sconn in sconns:
            sconn.execute("SET synchronous_commit = off")
        limiter = ClusterLimiter(
            dsn, "bench", Limiter(), lambda: False, list, Metrics(), str, connections=size
        )
        await limiter.tick()
        ways: list[AsyncWay | ThreadWay | LimiterWay] = [
            AsyncWay(aconns),
            ThreadWay(sconns),
            LimiterWay(limiter),
        ]
        for callers in (1, 16):
            for way in ways:
                got, window, cpu = await closed_loop(way.check, callers, WARMUP, DURATION)
                print(
                    f"| {way.name} | {size} | {callers} "
                    f"| {median(got) * 1e6:.0f} | {percentile(got, 99) * 1e6:.0f} "
                    f"| {len(got) / window:,.0f} | {cpu / len(got) * 1e6:.0f} |",
                    flush=True,
                )
        await limiter.close()
        for conn in aconns:
            await conn.close()
        for sconn in sconns:
            sconn.close()


def main() -> int:
    print(f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}), python {sys.version.split()[0]}")
    with PostgresCluster.start_temporary(durable=True) as cluster:
        PostgreSQLDatabase.open(cluster.dsn).close()  # the schema, with the functions
        asyncio.run(run(cluster.dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
