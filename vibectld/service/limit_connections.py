"""The cluster limiter's own connections to PostgreSQL, on the event loop.

Not the registry's connection (a usage write may hold it) and not a thread's: measured
on the limiter's round trip (bench/limiter_connections.py), psycopg's AsyncConnection on
the loop costs less of the daemon's CPU per check than a sync connection in a thread and
is as fast or faster at 1 and 16 callers; a few of them serve 16 callers at about twice
the rate of one, which queues them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

import psycopg

AsyncConnection = psycopg.AsyncConnection[tuple[Any, ...]]


class Connections:
    """A few connections on the event loop, handed out first come, first served."""

    def __init__(self, conninfo: str, size: int, statement_timeout_ms: int) -> None:
        self._conninfo = conninfo  # a secret: never logged
        self._size = size
        self._statement_timeout_ms = statement_timeout_ms
        self._idle: deque[AsyncConnection] = deque()
        self._waiters: deque[asyncio.Future[AsyncConnection]] = deque()
        # Every connection opened and not yet closed, idle or in use: close() ends them
        # all, including one a cancelled call still holds.
        self._all: set[AsyncConnection] = set()
        self.open = 0  # idle or in use

    async def fill(self) -> None:
        """Open connections up to the pool's size (raises psycopg.Error)."""
        while self.open < self._size:
            conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
            self._all.add(conn)
            try:
                # Rate events and leases are a minute's state: a crash of the database
                # may lose its last moments of them, and nothing else. Not waiting for
                # the WAL flush takes the disk off every limited call's path.
                await conn.execute(
                    "SET synchronous_commit = off; "
                    f"SET statement_timeout = {int(self._statement_timeout_ms)}"
                )
            except BaseException:
                # Also when cancelled (a stop during start-up): never left open.
                self._all.discard(conn)
                conn.pgconn.finish()
                raise
            self.open += 1
            self.put(conn)

    async def get(self, within: float) -> AsyncConnection:
        """An idle connection, waiting up to `within` s for one (raises TimeoutError)."""
        if self._idle:
            return self._idle.popleft()
        waiter: asyncio.Future[AsyncConnection] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(within):
                return await waiter
        except BaseException:
            # Handed over just as the wait ended: give it to the next in line.
            if waiter.done() and not waiter.cancelled():
                self.put(waiter.result())
            raise

    def put(self, conn: AsyncConnection) -> None:
        if conn.closed or conn.broken:
            self.open -= 1
            self._all.discard(conn)
            conn.pgconn.finish()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        self._idle.append(conn)

    def drop_idle(self) -> None:
        """Close the idle connections: one broke, so the server likely dropped them all
        (a restart); the next tick opens new ones rather than calls finding out."""
        while self._idle:
            conn = self._idle.popleft()
            self.open -= 1
            self._all.discard(conn)
            conn.pgconn.finish()  # no round trip, and nothing to wait for

    async def close(self) -> None:
        while self._idle:
            conn = self._idle.popleft()
            self.open -= 1
            self._all.discard(conn)
            with contextlib.suppress(psycopg.Error):
                await conn.close()
        # Held by a call that never gave it back (cancelled by the stop): ended here,
        # without a round trip, rather than left for the garbage collector.
        for conn in list(self._all):
            self._all.discard(conn)
            conn.pgconn.finish()
