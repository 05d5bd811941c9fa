"""How the cluster limiter should reach PostgreSQL from the event loop: measured.

    python -m bench.limiter_connections     # a temporary durable PostgreSQL 15

One operation, the rpm step every call of a limited client makes when the store is
shared (`SELECT vibectld_count_request(client, rpm)`, service/cluster_limits.py), over
clients c1..c1000 with rpm high enough that every call is counted (the insert path, the
common one). Two ways to run it, each with 1 and 4 connections, at 1 and 16 callers:

  async    psycopg's AsyncConnection on the event loop
  thread   psycopg's sync Connection, the call handed to a thread (run_in_executor)

Each connection runs with synchronous_commit off, as the limiter's do (its rows are a
minute's worth of state; see cluster_limits.py). Reported: p50 and p99 µs per check,
checks per second, and this process's CPU µs per check (what the daemon pays).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from bench.postgres import PostgresCluster
from vibectld.store.postgresql import PostgreSQLDatabase

CLIENTS = 1000
CHECK = "SELECT vibectld_count_request(%s, %s)"
RPM = 1_000_000_000
DURATION = 2.0


class AsyncWay:
    name = "async"

    def __init__(self, conns: list[psycopg.AsyncConnection[Any]]) -> None:
        self.idle: asyncio.Queue[psycopg.AsyncConnection[Any]] = asyncio.Queue()
        for conn in conns:
            self.idle.put_nowait(conn)

    async def check(self, client: str) -> None:
        conn = await self.idle.get()
        try:
            await conn.execute(CHECK, (client, RPM), prepare=True)
        finally:
            self.idle.put_nowait(conn)


class ThreadWay:
    name = "thread"

    def __init__(self, conns: list[psycopg.Connection[Any]]) -> None:
        self.idle: asyncio.Queue[psycopg.Connection[Any]] = asyncio.Queue()
        for conn in conns:
            self.idle.put_nowait(conn)
        self.pool = ThreadPoolExecutor(len(conns))

    async def check(self, client: str) -> None:
        conn = await self.idle.get()
        try:
            await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: conn.execute(CHECK, (client, RPM), prepare=True)
            )
        finally:
            self.idle.put_nowait(conn)


async def closed_loop(
    op: Callable[[str], Awaitable[None]], callers: int
) -> tuple[list[float], float, float]:
    latencies: list[float] = []
    stop = False

    async def caller(seed: int) -> None:
        rng = random.Random(seed)
        while not stop:
            client = f"c{rng.randint(1, CLIENTS)}"
            start = time.perf_counter()
            await op(client)
            latencies.append(time.perf_counter() - start)

    tasks = [asyncio.create_task(caller(i)) for i in range(callers)]
    await asyncio.sleep(0.3)
    latencies.clear()
    began, cpu = time.perf_counter(), time.process_time()
    await asyncio.sleep(DURATION)
    got = list(latencies)
    window, cpu = time.perf_counter() - began, time.process_time() - cpu
    stop = True
    await asyncio.gather(*tasks)
    return got, window, cpu


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
        ways: list[AsyncWay | ThreadWay] = [AsyncWay(aconns), ThreadWay(sconns)]
        for callers in (1, 16):
            for way in ways:
                got, window, cpu = await closed_loop(way.check, callers)
                ordered = sorted(got)
                print(
                    f"| {way.name} | {size} | {callers} "
                    f"| {statistics.median(got) * 1e6:.0f} "
                    f"| {ordered[int(0.99 * len(ordered))] * 1e6:.0f} "
                    f"| {len(got) / window:,.0f} | {cpu / len(got) * 1e6:.0f} |",
                    flush=True,
                )
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
