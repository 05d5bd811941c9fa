"""psycopg 3 against asyncpg on the round trips vibectld's request path will make.

    python -m bench.pg_drivers                 # starts its own PostgreSQL 15 (durable, as
                                               # in production) in a temporary directory
    python -m bench.pg_drivers --dsn "host=… dbname=…"   # or uses yours (creates and drops
                                               # its bench_* tables there)

Three operations, each at 1 and 16 concurrent callers on one pool per driver:

  select   a client's row by primary key (the registry lookup of every call)
  upsert   INSERT … ON CONFLICT DO UPDATE adding to a per-day counter (usage, rpm)
  slot     a transaction taking a concurrency slot only if the client holds fewer than
           N: lock the client's row, insert where count < N (the cluster-wide
           --concurrency); the slot is released right after, untimed but inside the loop,
           so ops/s counts take-and-release pairs

psycopg runs with prepared statements and binary results, once with one round trip per
statement and once in pipeline mode (libpq sends the transaction's four statements in one
flush). asyncpg runs as create_pool() gives it (it resets a connection with a query when
the pool takes it back) and with that reset turned off. asyncpg is optional (a dev
dependency): without it only psycopg is measured.

The drivers take turns in short windows (--rounds per row), so load from elsewhere on the
machine falls on each alike. Reported per row: p50 and p99 latency, operations per second,
and this process's CPU time per operation, the part of the cost the daemon itself pays
(the server's share is the same for every driver).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import psycopg_pool

from bench.op_loop import closed_loop
from bench.postgres import PostgresCluster
from bench.result import median, percentile

SLOT_LIMIT = 4
CALLERS = (1, 16)

SCHEMA = """
DROP TABLE IF EXISTS bench_slots, bench_usage, bench_clients;
CREATE TABLE bench_clients (
    id text PRIMARY KEY,
    name text NOT NULL,
    kid text NOT NULL,
    revoked_at timestamptz,
    expires_at timestamptz,
    rpm integer,
    concurrency integer,
    tokens_per_day bigint,
    models text[]
);
INSERT INTO bench_clients (id, name, kid, expires_at, rpm, concurrency, models)
    SELECT 'c' || g, 'client-' || g, '20260101T000000Z-0a1b2c',
           now() + interval '90 days', 60, 4, ARRAY['gpt-4o-mini', 'echo']
    FROM generate_series(1, 1000) AS g;
CREATE TABLE bench_usage (
    client_id text NOT NULL,
    day date NOT NULL,
    requests bigint NOT NULL,
    tokens bigint NOT NULL,
    PRIMARY KEY (client_id, day)
);
CREATE TABLE bench_slots (
    id bigserial PRIMARY KEY,
    client_id text NOT NULL,
    node text NOT NULL,
    taken_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON bench_slots (client_id);
ANALYZE;
"""
DROP = "DROP TABLE IF EXISTS bench_slots, bench_usage, bench_clients"

SELECT_CLIENT = "SELECT * FROM bench_clients WHERE id = $1"
UPSERT_USAGE = (
    "INSERT INTO bench_usage (client_id, day, requests, tokens) VALUES ($1, current_date, 1, $2)"
    " ON CONFLICT (client_id, day) DO UPDATE"
    " SET requests = bench_usage.requests + 1, tokens = bench_usage.tokens + excluded.tokens"
)
LOCK_CLIENT = "SELECT 1 FROM bench_clients WHERE id = $1 FOR UPDATE"
TAKE_SLOT = (
    "INSERT INTO bench_slots (client_id, node) SELECT $1, 'bench'"
    " WHERE (SELECT count(*) FROM bench_slots WHERE client_id = $1) < $2 RETURNING id"
)
RELEASE_SLOT = "DELETE FROM bench_slots WHERE id = $1"


def pyformat(query: str) -> str:
    """asyncpg's $n placeholders as psycopg's %(pn)s ones (a repeated $1 stays one value)."""
    for n in range(9, 0, -1):
        query = query.replace(f"${n}", f"%(p{n})s")
    return query


class Driver(Protocol):
    name: str

    async def open(self, dsn: str, url: str, size: int) -> None: ...
    async def close(self) -> None: ...
    async def select(self, client: str) -> None: ...
    async def upsert(self, client: str) -> None: ...
    async def take_slot(self, client: str) -> int | None: ...
    async def release_slot(self, slot: int) -> None: ...


class Psycopg:
    """psycopg 3 with psycopg_pool; prepared statements, binary results."""

    def __init__(self, *, pipeline: bool) -> None:
        self.pipeline = pipeline
        self.name = "psycopg pipeline" if pipeline else "psycopg"
        self.pool: psycopg_pool.AsyncConnectionPool[psycopg.AsyncConnection[Any]] | None = None
        self.select_q = pyformat(SELECT_CLIENT)
        self.upsert_q = pyformat(UPSERT_USAGE)
        self.lock_q = pyformat(LOCK_CLIENT)
        self.take_q = pyformat(TAKE_SLOT)
        self.release_q = pyformat(RELEASE_SLOT)

    async def open(self, dsn: str, url: str, size: int) -> None:
        self.pool = psycopg_pool.AsyncConnectionPool(
            dsn, min_size=size, max_size=size, open=False, kwargs={"autocommit": True}
        )
        await self.pool.open(wait=True)

    async def close(self) -> None:
        assert self.pool is not None
        await self.pool.close()

    async def select(self, client: str) -> None:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            cur = await conn.execute(self.select_q, {"p1": client}, prepare=True, binary=True)
            row = await cur.fetchone()
            assert row is not None

    async def upsert(self, client: str) -> None:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            await conn.execute(self.upsert_q, {"p1": client, "p2": 120}, prepare=True)

    async def take_slot(self, client: str) -> int | None:
        assert self.pool is not None
        args = {"p1": client, "p2": SLOT_LIMIT}
        async with self.pool.connection() as conn:
            if self.pipeline:
                # BEGIN, the lock, the insert and COMMIT leave in one flush; the results
                # are read as they come back.
                async with conn.pipeline(), conn.transaction():
                    await conn.execute(self.lock_q, args, prepare=True)
                    cur = await conn.execute(self.take_q, args, prepare=True, binary=True)
                row = await cur.fetchone()
            else:
                async with conn.transaction():
                    await conn.execute(self.lock_q, args, prepare=True)
                    cur = await conn.execute(self.take_q, args, prepare=True, binary=True)
                    row = await cur.fetchone()
        return None if row is None else int(row[0])

    async def release_slot(self, slot: int) -> None:
        assert self.pool is not None
        async with self.pool.connection() as conn:
            await conn.execute(self.release_q, {"p1": slot}, prepare=True)


class Asyncpg:
    """asyncpg's own pool; its statements are always prepared and binary."""

    def __init__(self, *, reset: bool) -> None:
        self.reset = reset
        self.name = "asyncpg" if reset else "asyncpg no-reset"
        self.pool: Any = None

    async def open(self, dsn: str, url: str, size: int) -> None:
        import asyncpg

        async def no_reset(conn: Any) -> None:
            return None

        # asyncpg takes a URI, not libpq's keyword/value form (see the README).
        extra: dict[str, Any] = {} if self.reset else {"reset": no_reset}
        self.pool = await asyncpg.create_pool(url, min_size=size, max_size=size, **extra)

    async def close(self) -> None:
        await self.pool.close()

    async def select(self, client: str) -> None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(SELECT_CLIENT, client)
            assert row is not None

    async def upsert(self, client: str) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(UPSERT_USAGE, client, 120)

    async def take_slot(self, client: str) -> int | None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_CLIENT, client)
            slot = await conn.fetchval(TAKE_SLOT, client, SLOT_LIMIT)
        return None if slot is None else int(slot)

    async def release_slot(self, slot: int) -> None:
        async with self.pool.acquire() as conn:
            await conn.execute(RELEASE_SLOT, slot)


@dataclass(frozen=True)
class Row:
    driver: str
    op: str
    callers: int
    ops: int
    p50_ms: float
    p99_ms: float
    ops_per_s: float
    cpu_us: float  # this process's CPU time per operation: what the daemon would pay

    def line(self) -> str:
        return (
            f"| {self.driver} | {self.op} | {self.callers} | {self.p50_ms:.3f} "
            f"| {self.p99_ms:.3f} | {self.ops_per_s:,.0f} | {self.cpu_us:.0f} |"
        )


def ops_of(driver: Driver) -> dict[str, Callable[[str], Awaitable[float | None]]]:
    async def select(client: str) -> float | None:
        await driver.select(client)
        return None

    async def upsert(client: str) -> float | None:
        await driver.upsert(client)
        return None

    async def slot(client: str) -> float | None:
        # Times the taking transaction alone; the release is the caller's next round
        # trip and is what keeps the table at its steady size.
        start = time.perf_counter()
        taken = await driver.take_slot(client)
        elapsed = time.perf_counter() - start
        if taken is not None:
            await driver.release_slot(taken)
        return elapsed

    return {"select": select, "upsert": upsert, "slot": slot}


async def measure(
    found: list[Driver], dsn: str, url: str, rounds: int, warmup: float, duration: float
) -> list[Row]:
    """Every driver's pools open at once; the drivers take turns, `rounds` short windows
    each per cell, so a neighbour's load on the machine falls on all of them alike."""
    rows = []
    for callers in CALLERS:
        for driver in found:
            await driver.open(dsn, url, callers)
        try:
            for op_name in ("select", "upsert", "slot"):
                latencies: dict[str, list[float]] = {d.name: [] for d in found}
                windows: dict[str, float] = dict.fromkeys(latencies, 0.0)
                cpus: dict[str, float] = dict.fromkeys(latencies, 0.0)
                for _ in range(rounds):
                    for driver in found:
                        got, window, cpu = await closed_loop(
                            ops_of(driver)[op_name], callers, warmup, duration / rounds
                        )
                        latencies[driver.name] += got
                        windows[driver.name] += window
                        cpus[driver.name] += cpu
                for driver in found:
                    got = latencies[driver.name]
                    rows.append(
                        Row(
                            driver=driver.name,
                            op=op_name,
                            callers=callers,
                            ops=len(got),
                            p50_ms=median(got) * 1000,
                            p99_ms=percentile(got, 99) * 1000,
                            ops_per_s=len(got) / windows[driver.name],
                            cpu_us=cpus[driver.name] / len(got) * 1e6,
                        )
                    )
                    print(rows[-1].line(), flush=True)
        finally:
            for driver in found:
                await driver.close()
    return rows


def drivers() -> list[Driver]:
    found: list[Driver] = [Psycopg(pipeline=False), Psycopg(pipeline=True)]
    if importlib.util.find_spec("asyncpg") is not None:
        found += [Asyncpg(reset=True), Asyncpg(reset=False)]
    else:
        print("asyncpg is not installed: measuring psycopg only", file=sys.stderr)
    return found


async def run(dsn: str, url: str, rounds: int, warmup: float, duration: float) -> list[Row]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(SCHEMA)
    try:
        print("| driver | op | callers | p50 ms | p99 ms | ops/s | client CPU µs/op |")
        print("|---|---|---|---|---|---|---|")
        return await measure(drivers(), dsn, url, rounds, warmup, duration)
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(DROP)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_drivers", description=__doc__)
    parser.add_argument("--dsn", help="a libpq connection string (default: a temporary server)")
    parser.add_argument("--url", help="the same as a postgresql:// URI, for asyncpg")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per row")
    parser.add_argument("--rounds", type=int, default=5, help="turns the drivers take per row")
    parser.add_argument("--warmup", type=float, default=0.2, help="seconds before each turn")
    parser.add_argument(
        "--no-fsync",
        action="store_true",
        help="temporary server only: fsync and synchronous_commit off, as the tests run it",
    )
    args = parser.parse_args(argv)
    print(
        f"psycopg {psycopg.__version__} ({psycopg.pq.__impl__}, libpq {psycopg.pq.version()}), "
        f"python {sys.version.split()[0]}"
    )
    if args.dsn:
        if not args.url and importlib.util.find_spec("asyncpg") is not None:
            parser.error("--url is needed too when asyncpg is installed")
        asyncio.run(run(args.dsn, args.url or "", args.rounds, args.warmup, args.duration))
        return 0
    with PostgresCluster.start_temporary(durable=not args.no_fsync) as cluster:
        print(f"temporary PostgreSQL on 127.0.0.1:{cluster.port}, durable={cluster.durable}")
        asyncio.run(run(cluster.dsn, cluster.url_for(), args.rounds, args.warmup, args.duration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
