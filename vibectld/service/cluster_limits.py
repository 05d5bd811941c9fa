"""Per-client rpm and concurrency, exact across the nodes that share one PostgreSQL.

Used instead of deciding in memory when the store is shared (storage.backend:
postgresql). A call's two steps are one round trip to a PL/pgSQL function
(store/postgresql_schema.py, since schema version 2, `vibectld_admit`): its rpm step, then its
concurrency slot, each under the client's advisory lock and by the database's clock (so
the nodes' clocks do not matter); it records what it admitted, so two nodes counting the
same client take turns, and 5 rpm is 5 however the calls are spread. A refused call takes
nothing. Only a client with either limit set pays the round trip. The servicer runs the
checks in memory first and raises the refusals in the contract's order (servicer.py).

The database can fail without failing a call. When the store is stale (the predicate the
daemon passes) or a round trip fails or takes longer than ROUND_TRIP_TIMEOUT, the call is
decided here alone, against this node's share of each limit: max(1, limit // live nodes),
with the node's own Limiter, which counts every call this node admitted either way, so a
fallback starts from what the node really served. After a failure the database is left
alone for BACKOFF_SECONDS, so an outage delays only the calls waiting on it then (by at
most ROUND_TRIP_TIMEOUT), once per BACKOFF_SECONDS, not every call. A round trip that
times out is never cancelled (psycopg would wait for the server to confirm the cancel): it
finishes in the background, and a lease it may have taken is released.

Releases are off the response path: a finished call's lease id is queued, and the next
round trip of any call on this node carries the queue (deleted before that call's lock is
taken, so it costs no round trip of its own); what no call carries within RELEASE_DELAY
goes in a batch of its own. A release that fails is queued again; the tick retries it.
Every TICK_SECONDS the node marks itself alive in `lease_holders` and deletes its leases
that no call here holds (a release that never arrived); at start it claims its name
there, refusing to start while a live node holds it (node_name.py), and deletes every
lease an earlier run left under it; at a clean stop it removes itself. Leases of a node
silent for LEASE_TIMEOUT (killed, cut off) stop counting: its slots come back within
LEASE_TIMEOUT of its death. A node whose name another run took over while it was cut off
(two nodes given one name) keeps to its share, as when the database is away, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from vibectld.ops.metrics import Metrics
from vibectld.runtime import Runtime
from vibectld.service.limit_connections import AsyncConnection, Connections
from vibectld.service.limits import Limiter, concurrency_refusal, rpm_refusal
from vibectld.service.node_name import Holder, NodeName
from vibectld.service.staleness import is_stale
from vibectld.store.base import NodeInfo
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import Registry

log = structlog.get_logger("vibectld.limits")

# A killed node's leases stop counting this long after its last tick (every
# TICK_SECONDS): three ticks missed, so a slow one is not taken for a death; its last
# tick came before its death, so its slots are back within 6 s, inside the contract's 10.
LEASE_TIMEOUT = 6.0
TICK_SECONDS = 2.0
# The most a call waits on the limiter's database before deciding on this node's share.
ROUND_TRIP_TIMEOUT = 0.25
# After a failed or slow round trip, how long calls go straight to the fallback.
BACKOFF_SECONDS = 1.0
# Connections of the limiter's own (not the registry's, which a usage write may hold).
# Measured (bench/limiter_connections.py): one connection serialises 16 callers; four
# serve them at ~2.4x the rate.
CONNECTIONS = 4
# The tick does not delete a lease younger than this: a call may hold one that the tick's
# list of held leases was read before (a round trip is at most statement_timeout).
LEASE_GRACE = 5.0
STATEMENT_TIMEOUT_MS = 2000
# The rate events and counts of clients with an empty window, and the leases of nodes gone
# for an hour: every 5 ticks.
SWEEP_EVERY = 5

# How long a finished call's release waits for a call's round trip to carry it, before it
# goes on its own: under load one always comes sooner, and a release costs no round trip.
RELEASE_DELAY = 0.005

_ADMIT_SQL = "SELECT retry_ms, running FROM vibectld_admit(%s, %s, %s, %s, %s, %s, %s)"
_RELEASE_SQL = "DELETE FROM leases WHERE id = ANY(%s)"
_TICK_SQL = (
    "SELECT mine, holder_instance, holder_host, holder_pid, holder_machine, holder_alive_at, "
    "holder_age "
    "FROM vibectld_limits_tick(%s, %s, %s, %s, %s, %s, %s, %s, %s)"
)
# Only while the name is this run's: another run's leases are not this one's to delete.
_STOP_SQL = (
    "WITH mine AS (DELETE FROM lease_holders WHERE node = %s AND instance = %s RETURNING node) "
    "DELETE FROM leases WHERE node IN (SELECT node FROM mine)"
)


class _Unavailable(Exception):
    """The limiter's database did not answer (in time): decide on this node's share."""


@dataclass(slots=True)
class Lease:
    """One running call's concurrency slot: here always, in the database when `id` is set."""

    client_id: str
    id: str | None


class ClusterLimiter:
    def __init__(
        self,
        conninfo: str,
        node: str,
        local: Limiter,
        stale: Callable[[], bool],
        nodes: Callable[[], list[NodeInfo]],
        metrics: Metrics,
        clean: Callable[[psycopg.Error], str],
        *,
        connections: int = CONNECTIONS,
    ) -> None:
        self._conninfo = conninfo  # a secret: never logged, never in a repr
        self.node = node
        self._local = local
        self._stale = stale
        self._nodes = nodes
        self._metrics = metrics
        self._clean = clean
        self._pool = Connections(conninfo, connections, STATEMENT_TIMEOUT_MS)
        self._retry_at = 0.0  # time.monotonic() before which calls use the fallback
        # Lease ids taken, or being taken, by calls on this node: the tick keeps them.
        self._held: set[str] = set()
        # Lease ids given back here and not yet deleted there.
        self._releasing: set[str] = set()
        self._release_timer: asyncio.TimerHandle | None = None
        self._releaser: asyncio.Task[None] | None = None
        self._orphans: set[asyncio.Task[Any]] = set()
        self._fallback_reason: str | None = None  # logged once per spell
        self.name = NodeName(node, conninfo, clean)
        self._round_trips = {
            (step, result): metrics.limit_round_trips.labels(step, result)
            for step in ("admit", "release", "tick")
            for result in ("ok", "failed", "timeout")
        }

    def __repr__(self) -> str:
        return f"ClusterLimiter(node={self.node!r})"

    @classmethod
    def for_registry(
        cls,
        registry: Registry,
        node: str,
        local: Limiter,
        metrics: Metrics,
        stale: Callable[[], bool],
    ) -> ClusterLimiter:
        """The limiter of a PostgreSQL registry's database; this node's earlier leases
        are deleted now (or, if the database does not answer, by the first ticks)."""
        db = registry._db  # the registry's database object (its conninfo, not its connection)
        assert isinstance(db, PostgreSQLDatabase)
        # A stuck connection fails within seconds, not at TCP's retransmission timeout.
        params = conninfo_to_dict(db.conninfo)
        conninfo = (
            db.conninfo
            if "tcp_user_timeout" in params
            else make_conninfo(db.conninfo, tcp_user_timeout=5000)
        )
        limiter = cls(
            conninfo,
            node,
            local,
            stale,
            registry.nodes,
            metrics,
            db.clean,
        )
        limiter.name.claim(LEASE_TIMEOUT)
        return limiter

    # -- the steps ----------------------------------------------------------------------

    # runtime.Admission.admit's signature, restated: the servicer calls this or a
    # worker's admission alike, and mypy checks both against the Protocol.
    async def admit(
        self,
        client_id: str,
        rpm: int | None,
        concurrency: int | None,
        *,
        slot: bool,
        model_id: str | None = None,
    ) -> Lease | None:
        """The call's rpm step and, with `slot`, its concurrency slot, in one round trip
        and in that order: LimitExceeded for rpm (nothing counted or taken) or for
        concurrency (counted, nothing taken). A Lease with `slot` (given back with
        `release`), else None. Only what is limited goes to the database. `model_id` is
        for a worker's admission (workers/view.py), which checks budgets too; here the
        servicer has checked them against this node's store."""
        lease_here = slot and concurrency is None
        if rpm is None and (not slot or lease_here):
            return self._slot(client_id, None) if slot else None
        reason = self._why_not_database()
        if reason is None:
            lease_id = uuid.uuid4().hex if slot and not lease_here else None
            if lease_id is not None:
                self._held.add(lease_id)
            carried = self._carried()
            params = (client_id, rpm, lease_id, self.node, concurrency, LEASE_TIMEOUT, carried)
            try:
                retry_ms, running = await self._call("admit", _ADMIT_SQL, params, carried=carried)
            except BaseException as e:
                if lease_id is not None:
                    # Taken or not, it is no call's now (it may commit after a timeout).
                    self._held.discard(lease_id)
                    self._release_later(lease_id)
                if not isinstance(e, _Unavailable):
                    raise  # cancelled: the call is gone
                reason = "unavailable"
            else:
                if retry_ms:
                    self._held.discard(lease_id or "")
                    assert rpm is not None
                    raise rpm_refusal(rpm, retry_ms)
                if rpm is not None:
                    self._local.note_request(client_id)  # counted here too, for a fallback
                if running >= 0:
                    self._held.discard(lease_id or "")
                    assert concurrency is not None
                    raise concurrency_refusal(running, concurrency)
                return self._slot(client_id, None, lease_id) if slot else None
        # This node alone, on its share of each limit, in the same order.
        self._fell_back(reason)
        if rpm is not None:
            self._local.count_request(client_id, self._share(rpm))
        if not slot:
            return None
        return self._slot(client_id, None if lease_here else self._share(concurrency or 1))

    def _slot(self, client_id: str, limit: int | None, lease_id: str | None = None) -> Lease:
        """The slot as this node counts it (checked against `limit` unless None)."""
        self._local.take(client_id, limit)
        return Lease(client_id, lease_id)

    async def count_request(self, client_id: str, rpm: int) -> None:
        """The rpm step alone."""
        await self.admit(client_id, rpm, None, slot=False)

    async def acquire(self, client_id: str, concurrency: int) -> Lease:
        """A concurrent slot alone."""
        lease = await self.admit(client_id, None, concurrency, slot=True)
        assert lease is not None
        return lease

    async def usd_spent_month(self, client_id: str, now: float) -> float | None:
        return None  # the store's totals already hold every node's (read after each flush)

    def release(self, lease: Lease) -> None:
        """Give the slot back: here at once, in the database off the response path."""
        self._local.give_back(lease.client_id)
        if lease.id is not None:
            self._held.discard(lease.id)
            self._release_later(lease.id)

    @contextlib.contextmanager
    def holding(self, lease: Lease) -> Iterator[None]:
        try:
            yield
        finally:
            self.release(lease)

    # -- the fallback -------------------------------------------------------------------

    def _why_not_database(self) -> str | None:
        if self._stale():
            return "stale"
        if self.name.taken is not None:
            return "name_in_use"
        if not self._pool.open or time.monotonic() < self._retry_at:
            return "unavailable"
        if self._fallback_reason is not None:
            self._fallback_reason = None
            log.info("limits.cluster_wide", hint="limits are exact across the nodes again")
        return None

    def _fell_back(self, reason: str) -> None:
        self._metrics.limit_fallbacks.labels(reason).inc()
        if self._fallback_reason is None:
            self._fallback_reason = reason
            until = (
                "its server.name is its own" if reason == "name_in_use" else "the database answers"
            )
            log.warning(
                "limits.per_node",
                reason=reason,
                live_nodes=self.live_nodes(),
                hint="each node enforces its share of every client's rpm and concurrency "
                f"until {until} again",
            )

    def _share(self, limit: int) -> int:
        return max(1, limit // self.live_nodes())

    def live_nodes(self) -> int:
        """The nodes that were alive when this node last heard from the database: their
        heartbeats within LEASE_TIMEOUT of the newest (at least this node)."""
        beats = [node.heartbeat_at for node in self._nodes()]
        if not beats:
            return 1
        newest = max(beats)
        return max(1, sum(1 for at in beats if at >= newest - LEASE_TIMEOUT))

    # -- round trips --------------------------------------------------------------------

    async def _call(
        self,
        step: str,
        sql: str,
        params: tuple[Any, ...],
        within: float = ROUND_TRIP_TIMEOUT,
        *,
        carried: list[str] | tuple[()] = (),
    ) -> tuple[Any, ...]:
        """One statement's row (empty if none), or _Unavailable after `within` seconds.
        The releases `carried` in it are queued again if it did not commit."""
        deadline = time.monotonic() + within
        try:
            conn = await self._pool.get(within)
        except BaseException as e:
            self._releasing.update(carried)  # never sent
            if not isinstance(e, TimeoutError):
                raise  # cancelled
            self._failed(step, "timeout")
            raise _Unavailable from None
        task = asyncio.get_running_loop().create_task(self._execute(conn, sql, params))
        try:
            done, _ = await asyncio.wait((task,), timeout=max(0.0, deadline - time.monotonic()))
        except asyncio.CancelledError:
            self._orphan(task, carried)  # the call is gone; the statement finishes without it
            raise
        if not done:
            # Not cancelled: psycopg would wait for the server to confirm a cancel. It
            # ends on its own (statement_timeout) and gives its connection back then.
            self._orphan(task, carried)
            self._failed(step, "timeout")
            raise _Unavailable
        try:
            value = task.result()
        except psycopg.Error as e:
            self._releasing.update(carried)
            if isinstance(e, psycopg.OperationalError):
                self._pool.drop_idle()
            self._failed(step, "failed", e)
            raise _Unavailable from None
        except Exception:
            self._releasing.update(carried)
            # Not the database's doing, but still no reason to refuse a call over it.
            log.exception("limits.round_trip_error", step=step)
            self._failed(step, "failed")
            raise _Unavailable from None
        self._round_trips[step, "ok"].inc()
        return value

    async def _execute(
        self, conn: AsyncConnection, sql: str, params: tuple[Any, ...]
    ) -> tuple[Any, ...]:
        try:
            cursor = await conn.execute(sql, params, prepare=True)
            row = await cursor.fetchone() if cursor.description else None
            return row or ()
        finally:
            self._pool.put(conn)

    def _orphan(self, task: asyncio.Task[Any], carried: list[str] | tuple[()]) -> None:
        self._orphans.add(task)

        def done(task: asyncio.Task[Any]) -> None:
            self._orphans.discard(task)
            # Retrieved: nobody waits for a late result. Releases it carried are queued
            # again only once it failed, so that no two statements delete one lease.
            if task.cancelled() or task.exception() is not None:
                self._release_later(*carried)

        task.add_done_callback(done)

    def _failed(self, step: str, result: str, error: psycopg.Error | None = None) -> None:
        self._round_trips[step, result].inc()
        self._retry_at = time.monotonic() + BACKOFF_SECONDS
        if error is not None and step in ("tick", "release"):
            log.debug("limits.round_trip_failed", step=step, error=self._clean(error))

    # -- releases and the tick ----------------------------------------------------------

    def _release_later(self, *lease_ids: str) -> None:
        self._releasing.update(lease_ids)
        if self._releasing and self._release_timer is None and self._releaser is None:
            loop = asyncio.get_running_loop()
            self._release_timer = loop.call_later(RELEASE_DELAY, self._start_releaser)

    def _carried(self) -> list[str]:
        """The queued releases, taken off the queue by the round trip that carries them."""
        if not self._releasing:
            return []
        batch = list(self._releasing)
        self._releasing.clear()
        return batch

    def _start_releaser(self) -> None:
        self._release_timer = None
        if self._releasing and self._releaser is None and self._pool.open:
            self._releaser = asyncio.get_running_loop().create_task(self._release_queued())

    async def _release_queued(self) -> None:
        """Delete what no call carried; on failure it waits for the next tick."""
        try:
            while self._releasing and self._pool.open:
                batch = self._carried()
                try:
                    await self._call("release", _RELEASE_SQL, (batch,), TICK_SECONDS, carried=batch)
                except _Unavailable:
                    return
        finally:
            self._releaser = None

    async def tick(self, sweep: bool = False) -> None:
        """Open missing connections, mark this node alive and drop the leases no call
        here holds; retry queued releases. Raises _Unavailable when it could not."""
        if self._pool.open < CONNECTIONS:
            try:
                await self._pool.fill()
            except psycopg.Error as e:
                if not self._pool.open:
                    self._failed("tick", "failed", e)
                    raise _Unavailable from None
        me = self.name.identity
        mine, *holder = await self._call(
            "tick",
            _TICK_SQL,
            (
                self.node,
                me.instance,
                me.host,
                me.pid,
                me.machine,
                list(self._held),
                LEASE_GRACE,
                LEASE_TIMEOUT,
                sweep,
            ),
            TICK_SECONDS,
        )
        self._retry_at = 0.0  # the database answers: calls may use it again
        self.name.held_by(None if mine else Holder(*holder))
        if self._release_timer is None:
            self._start_releaser()

    async def run(self) -> None:
        """Tick until cancelled (the daemon's stop); then leave the cluster cleanly."""
        ticks = 0
        try:
            while True:
                try:
                    await self.tick(sweep=ticks % SWEEP_EVERY == SWEEP_EVERY - 1)
                except _Unavailable:
                    pass  # counted; the next tick tries again
                except Exception:
                    # A node that stopped ticking would see its own leases stop counting.
                    log.exception("limits.tick_error")
                ticks += 1
                await asyncio.sleep(TICK_SECONDS)
        finally:
            await self.close()

    async def close(self) -> None:
        """Remove this node's leases and its mark (a clean stop: its slots are back at
        once) and close the connections."""
        if self._release_timer is not None:
            self._release_timer.cancel()  # the stop below deletes this node's leases
            self._release_timer = None
        # Statements under way end within statement_timeout; none is cancelled (above).
        pending = [*self._orphans, *([self._releaser] if self._releaser else [])]
        if pending:
            await asyncio.wait(pending, timeout=STATEMENT_TIMEOUT_MS / 1000)
        if self._pool.open:
            with contextlib.suppress(_Unavailable):
                await self._call(
                    "release", _STOP_SQL, (self.node, self.name.identity.instance), TICK_SECONDS
                )
        await self._pool.close()


def limit_across_nodes(rt: Runtime, registry: Registry) -> ClusterLimiter:
    """Give the runtime its cluster limiter and start its ticks (the daemon's start)."""

    def stale() -> bool:
        # storage.max_staleness as the current generation says (a reload may change it).
        return is_stale(registry, rt.config.storage.max_staleness_seconds, time.time())

    limiter = ClusterLimiter.for_registry(
        registry, rt.config.server.name, rt.limiter, rt.metrics, stale
    )
    rt.cluster = limiter
    rt.background(limiter.run())
    return limiter
