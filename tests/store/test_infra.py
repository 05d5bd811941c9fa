"""The real parts the store and cluster tests stand on: PostgreSQL and HAProxy work.

These check the fixtures themselves, with the chosen driver (psycopg 3), so that a broken
PostgreSQL or HAProxy setup fails here, plainly, rather than deep inside a store test.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable, Sequence

import psycopg
import pytest

from tests.haproxy import HAProxy
from tests.postgres import Postgres


async def _select_one(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute("SELECT 1")
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


def test_postgres_dsn_carries_a_password_and_connects(postgres: Postgres) -> None:
    assert "password=" in postgres.dsn
    assert asyncio.run(_select_one(postgres.dsn)) == 1
    assert asyncio.run(_select_one(postgres.socket_dsn)) == 1
    assert asyncio.run(_select_one(postgres.url)) == 1
    # Without the password the server refuses: the DSN's password is what gets us in.
    no_password = postgres.dsn.replace(f"password='{postgres.cluster.password}'", "")
    with pytest.raises(psycopg.OperationalError, match="password"):
        asyncio.run(_select_one(no_password))


def test_each_test_gets_its_own_empty_database(postgres: Postgres) -> None:
    async def check() -> None:
        async with await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as c:
            cur = await c.execute(
                "SELECT current_database(), count(*) FROM pg_tables WHERE schemaname = 'public'"
            )
            assert await cur.fetchone() == (postgres.dbname, 0)
            await c.execute("CREATE TABLE left_behind (x int)")

    asyncio.run(check())
    other = postgres.create_database("second")
    assert asyncio.run(_select_one(other)) == 1
    assert postgres.sql("SELECT count(*) FROM left_behind") == "0"


def test_listen_notify_round_trip(postgres: Postgres) -> None:
    async def round_trip() -> list[tuple[str, str]]:
        async with (
            await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as listener,
            await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True) as sender,
        ):
            await listener.execute("LISTEN revocations")
            await sender.execute("SELECT pg_notify('revocations', 'client-1')")
            await sender.execute("NOTIFY revocations, 'client-2'")
            return [
                (n.channel, n.payload) async for n in listener.notifies(timeout=5, stop_after=2)
            ]

    assert asyncio.run(round_trip()) == [("revocations", "client-1"), ("revocations", "client-2")]


def test_restart_cuts_connections_and_keeps_data(postgres: Postgres) -> None:
    async def scenario() -> None:
        conn = await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True)
        await conn.execute("CREATE TABLE kept (x int)")
        await conn.execute("INSERT INTO kept VALUES (42)")
        await asyncio.to_thread(postgres.restart)
        with pytest.raises(psycopg.OperationalError):
            await conn.execute("SELECT 1")
        await conn.close()
        async with await psycopg.AsyncConnection.connect(postgres.dsn) as again:
            cur = await again.execute("SELECT x FROM kept")
            assert await cur.fetchall() == [(42,)]

    asyncio.run(scenario())


def test_stop_then_start(postgres: Postgres) -> None:
    postgres.stop()
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(_select_one(postgres.dsn))
    postgres.start()
    assert asyncio.run(_select_one(postgres.dsn)) == 1


def test_a_test_that_leaves_the_server_stopped_does_not_break_the_next(
    postgres: Postgres,
) -> None:
    postgres.stop("immediate")  # a crash; the fixture's cleanup starts it again


def test_the_server_is_back_after_a_crash(postgres: Postgres) -> None:
    assert asyncio.run(_select_one(postgres.dsn)) == 1


# -- HAProxy -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _named_server(name: bytes) -> AsyncIterator[int]:
    """A tiny TCP server that answers every connection with its name, then echoes.

    Its connection handlers (HAProxy's health checks open one every 500 ms) are tracked
    and ended with it, so none is left for the garbage collector to warn about."""
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(name + b"\n")
            await writer.drain()
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(serve(reader, writer))
        handlers.add(task)
        task.add_done_callback(handlers.discard)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


async def _ask(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        name = await asyncio.wait_for(reader.readline(), 5)
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
        return name.strip()
    finally:
        writer.close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: a connection there is refused


def test_haproxy_round_robin_over_two_backends(
    haproxy: Callable[[Sequence[int]], HAProxy],
) -> None:
    async def scenario() -> None:
        async with _named_server(b"a") as a, _named_server(b"b") as b:
            lb = await asyncio.to_thread(haproxy, [a, b])
            await asyncio.to_thread(lb.wait_status, {a: "UP", b: "UP"})
            names = [await _ask(lb.port) for _ in range(6)]
            assert sorted(names) == [b"a"] * 3 + [b"b"] * 3
            assert names[0::2] == [names[0]] * 3  # alternating: round robin

    asyncio.run(scenario())


def test_haproxy_skips_a_dead_backend_and_reloads(
    haproxy: Callable[[Sequence[int]], HAProxy],
) -> None:
    async def scenario() -> None:
        dead = _dead_port()
        async with _named_server(b"a") as a, _named_server(b"c") as c:
            lb = await asyncio.to_thread(haproxy, [a, dead])
            # Before the health check marks it down, a refused connection is redispatched.
            assert [await _ask(lb.port) for _ in range(4)] == [b"a"] * 4
            await asyncio.to_thread(lb.wait_status, {a: "UP", dead: "DOWN"})
            assert [await _ask(lb.port) for _ in range(4)] == [b"a"] * 4

            await asyncio.to_thread(lb.set_backends, [a, c])
            await asyncio.to_thread(lb.wait_status, {a: "UP", c: "UP"})
            assert sorted([await _ask(lb.port) for _ in range(4)]) == [b"a", b"a", b"c", b"c"]

    asyncio.run(scenario())


def test_haproxy_notices_a_backend_that_goes_away(
    haproxy: Callable[[Sequence[int]], HAProxy],
) -> None:
    async def scenario() -> None:
        async with _named_server(b"a") as a:
            async with _named_server(b"b") as b:
                lb = await asyncio.to_thread(haproxy, [a, b])
                await asyncio.to_thread(lb.wait_status, {a: "UP", b: "UP"})
            # b is closed: within two checks (2 x 500 ms) it is out of rotation.
            await asyncio.to_thread(lb.wait_status, {b: "DOWN"}, 5)
            assert [await _ask(lb.port) for _ in range(4)] == [b"a"] * 4

    asyncio.run(scenario())
