"""The daemon's lifecycle: start() → serve_until_stopped() → stop(grace).

Signal handlers only set events; the lifecycle coroutine acts on them.
READY=1 goes out only once the TLS port and the admin socket are bound and the
registry is loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2

from vibectld.admin.routes import build_routes
from vibectld.admin.server import AdminServer, Caller
from vibectld.audit_trail import AuditTrail
from vibectld.config import DaemonConfig, keep_restart_only, restart_only_changes
from vibectld.generation import GenerationRejected, build_generation, reread_config
from vibectld.grpc_server import bind, build_server
from vibectld.ops.notify import Notifier
from vibectld.ops.watchdog import Heartbeat, Probe
from vibectld.providers.catalogue import ModelCatalogue
from vibectld.runtime import Runtime
from vibectld.service.staleness import StorageState, status_note, storage_state
from vibectld.startup import StartupError, open_state
from vibectld.store.base import NodeInfo
from vibectld.store.registry import ClientRecord, RegistryError
from vibectld.version import __version__

log = structlog.get_logger("vibectld")

SERVICE_NAME = "vibectl.llm_proxy.VibectlLLMProxy"
# The health service's name for the store alone: NOT_SERVING while its database does not
# answer or this node's view is stale, whatever storage.on_stale says. The overall ""
# and SERVICE_NAME are NOT_SERVING only while this node refuses calls (stale, refuse).
STORAGE_HEALTH_NAME = "vibectld.storage"
FLUSH_INTERVAL_SECONDS = 2.0
# While the database does not answer, how often the flush loop tries it again: a node
# notices it is back within this (plus one connection attempt), with no restart.
RECOVERY_PROBE_SECONDS = 0.5
# How often the health service, the logs and the STATUS line follow the store's state
# (the call gate does not wait for it: it asks the store on every call).
STORAGE_WATCH_SECONDS = 0.25
# How often the served certificate's expiry is looked at (renewal starts 30 days ahead).
CERTIFICATE_CHECK_SECONDS = 6 * 3600.0
# How long arrivals must pause before the server stops, and the most a drain may take.
DRAIN_QUIET_SECONDS = 0.1
DRAIN_MAX_SECONDS = 1.0


async def _close_later(catalogue: ModelCatalogue, delay: float) -> None:
    # Calls that started before the swap may still use the old catalogue's connections.
    await asyncio.sleep(delay)
    with contextlib.suppress(Exception):
        await catalogue.aclose()


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.notifier = Notifier()
        self.runtime: Runtime | None = None
        self._grpc: grpc.aio.Server | None = None
        self._admin: AdminServer | None = None
        self._health: health.aio.HealthServicer | None = None
        self._stop = asyncio.Event()
        self._reload_requested = asyncio.Event()
        # SIGHUPs whose audit rows are still to be written (by the reload task, off the loop).
        self._sighup_audits = 0
        self._reload_lock = asyncio.Lock()
        self._last_reload_error: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._audit_trail = AuditTrail()

    @property
    def grpc_port(self) -> int:
        assert self.runtime is not None
        return self.runtime.grpc_port

    async def start(self) -> None:
        self.runtime = rt = self._open_state()
        loop = asyncio.get_running_loop()

        def changed_elsewhere(record: ClientRecord) -> None:
            # Called from the thread that learned of another node's change: act on the loop.
            loop.call_soon_threadsafe(self._changed, record)

        rt.registry.on_change(changed_elsewhere)
        await self._start_grpc(rt)
        routes = build_routes(rt, self.reload, self.request_reload)
        self._admin = AdminServer(
            self.config.admin.socket, self.config.admin.group, routes, on_audit=self._audit
        )
        await self._admin.start()
        self._start_metrics(rt)
        # Everything loaded so far (the registry's records, llm and its plugins) lives as
        # long as the daemon: taken out of the cyclic GC, a full collection no longer walks
        # 100,000 client records while calls wait behind it.
        gc.collect()
        gc.freeze()
        rt.metrics.watch_storage(lambda: self._storage_state(rt))
        state = self._storage_state(rt)
        await self._set_health(state)  # before READY=1: a first health check has an answer
        self._tasks.append(asyncio.create_task(self._flush_usage(), name="flush-usage"))
        self._tasks.append(asyncio.create_task(self._watch_storage(state), name="storage"))
        self._tasks.append(asyncio.create_task(self._reload_on_request(), name="reload"))
        self._tasks.append(asyncio.create_task(self._watch_certificate(), name="certificate"))
        heartbeat = Heartbeat(rt, self.notifier, self._status_line, self._serving_proof())
        self._tasks.append(asyncio.create_task(heartbeat.run(), name="heartbeat"))
        self._log_started(rt)
        self.notifier.ready(self._status_line())

    def _open_state(self) -> Runtime:
        """The state directory, its keys and registry, and the first generation."""
        return open_state(self.config)

    # A worker binds the port its main process chose, beside the other workers
    # (SO_REUSEPORT: the kernel spreads connections over them); a lone daemon does not.
    _reuse_port = 0

    def _listen_address(self) -> str:
        return self.config.server.listen

    async def _start_grpc(self, rt: Runtime) -> None:
        listen = self._listen_address()
        limit = self.config.server.max_request_bytes
        server, self._health = build_server(rt, limit, self._reuse_port)
        port = bind(server, listen, rt)
        rt.grpc_host, rt.grpc_port = listen.rpartition(":")[0], port
        await server.start()
        self._grpc = server

    def _serving_proof(self) -> Probe | None:
        """What proves to the watchdog that calls are served; None: our own health check."""
        return None

    def _start_metrics(self, rt: Runtime) -> None:
        listen = self.config.metrics.listen
        if listen is None:
            return
        try:
            rt.metrics.serve(listen)
        except OSError as e:
            raise StartupError(
                f"cannot serve metrics on {listen}: {e.strerror}; change "
                "metrics.listen or stop the process using it"
            ) from None

    def _log_started(self, rt: Runtime) -> None:
        if self.config.server.public_url is None:
            log.warning(
                "server.public_url_unset",
                hint="issued URLs use this machine's name; set server.public_url to the "
                "address clients dial",
            )
        log.info(
            "started",
            listen=rt.grpc_address,
            admin_socket=str(self.config.admin.socket),
            models=len(rt.generation.catalogue.entries()),
            clients=rt.registry.counts()["active"],
            ca_sha256=rt.generation.tls.ca_sha256,
            pid=os.getpid(),
        )

    def _status_line(self) -> str:
        rt = self.runtime
        if rt is None:
            return "starting"
        line = (
            f"serving on {rt.grpc_address}; {rt.registry.counts()['active']} active clients; "
            f"{rt.inflight.total()} in flight"
        )
        note = status_note(self._storage_state(rt))
        if note:
            line += f"; {note}"
        if self._last_reload_error:
            line += f"; last reload rejected: {self._last_reload_error}"
        return line

    def _storage_state(self, rt: Runtime) -> StorageState:
        return storage_state(rt.registry, rt.generation.config.storage)

    async def _set_health(self, state: StorageState) -> None:
        assert self._health is not None
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        calls = not_serving if state.refusing else serving
        for name in ("", SERVICE_NAME):
            await self._health.set(name, calls)
        await self._health.set(STORAGE_HEALTH_NAME, serving if state.healthy else not_serving)

    async def _watch_storage(self, shown: StorageState) -> None:
        """Follow the store's state from `shown` (what the health service says now): the
        health service, a log record and the STATUS line, each when the state changes."""
        assert self.runtime is not None
        rt = self.runtime
        while True:
            state = self._storage_state(rt)
            if (state.degraded, state.stale, state.refusing) == (
                shown.degraded,
                shown.stale,
                shown.refusing,
            ):
                await asyncio.sleep(STORAGE_WATCH_SECONDS)
                continue
            await self._set_health(state)
            if state.stale and not shown.stale:
                log.error(
                    "storage.stale",
                    view_age_seconds=None if state.view_age is None else round(state.view_age, 1),
                    max_staleness_seconds=state.max_staleness,
                    on_stale=state.on_stale,
                    hint="this node refuses calls until its database answers"
                    if state.refusing
                    else "known clients are served; a secret revoked on another node meanwhile "
                    "may still work here",
                )
            elif shown.stale and not state.stale:
                log.info("storage.fresh", on_stale=state.on_stale)
            self.notifier.status(self._status_line())
            shown = state

    async def reload(self) -> list[str]:
        """Build a new generation from the config file and swap it in; raise if it is invalid.

        Returns notes about settings that only a restart applies.
        """
        assert self.runtime is not None
        async with self._reload_lock:
            self.notifier.reloading()
            log.info("reload.started")
            try:
                notes = self._swap_generation(self.runtime)
            except GenerationRejected as e:
                self._last_reload_error = str(e)
                log.error(
                    "reload.rejected", error=str(e), hint="the previous configuration keeps serving"
                )
                self.notifier.ready(self._status_line())
                raise
            self._last_reload_error = None
            log.info("reload.done", restart_needed=len(notes))
            self.notifier.ready(self._status_line())
            return notes

    def _swap_generation(self, rt: Runtime) -> list[str]:
        old = rt.generation
        fresh = reread_config(self.config.config_path, old.config)
        changed = restart_only_changes(old.config, fresh, self.config)
        config = keep_restart_only(old.config, fresh, self.config)
        rt.generation = build_generation(config, rt.signing, rt.registry, old.number + 1, ca=old.ca)
        rt.background(_close_later(old.catalogue, config.limits.request_timeout_seconds + 5))
        notes = [f"{key} changed: restart vibectld to apply" for key in changed]
        for note in notes:
            log.warning("reload.restart_needed", detail=note)
        return notes

    def _audit(self, caller: Caller, op: str, target: str | None, outcome: str) -> None:
        row = {
            "at": int(time.time()),
            "caller_uid": caller.uid,
            "caller_user": caller.user,
            "op": op,
            "target": target,
            "outcome": outcome,
        }
        self._store_audit(row)

    def _store_audit(self, row: dict[str, Any]) -> None:
        assert self.runtime is not None
        self._audit_trail.store(self.runtime.registry, row)

    def _on_sighup(self) -> None:
        log.info("reload.requested", audit=True, op="reload", caller_user="SIGHUP")
        self._sighup_audits += 1
        self.request_reload()

    async def _audit_sighups(self) -> None:
        """The audit rows of SIGHUPs received, written before the reload they asked for."""
        count, self._sighup_audits = self._sighup_audits, 0
        if self.runtime is None:
            return
        for _ in range(count):
            row = {
                "at": int(time.time()),
                "caller_uid": None,
                "caller_user": "SIGHUP",
                "op": "reload",
                "target": None,
                "outcome": "requested",
            }
            try:
                await asyncio.to_thread(self._store_audit, row)
            except Exception:
                # The journal record stands; a broken audit table must not stop the reload.
                log.exception("audit.store_failed")

    def request_reload(self) -> None:
        """Ask for a reload without waiting for it (SIGHUP, `vibectl-admin reload`)."""
        self._reload_requested.set()

    async def _reload_on_request(self) -> None:
        while True:
            await self._reload_requested.wait()
            self._reload_requested.clear()
            await self._audit_sighups()
            with contextlib.suppress(GenerationRejected):
                await self.reload()

    async def _watch_certificate(self) -> None:
        while True:
            await asyncio.sleep(CERTIFICATE_CHECK_SECONDS)
            self.check_certificate()

    def check_certificate(self) -> None:
        """Renew a server certificate about to expire: a daemon may run for longer than
        one is valid without ever being reloaded or restarted."""
        assert self.runtime is not None
        gen = self.runtime.generation
        if not gen.tls.renewal_due():
            return
        if gen.config.server.tls.self_managed:
            log.info("tls.renewing", hint="the server certificate expires soon; reloading")
            self.request_reload()
        else:
            log.warning(
                "tls.expiring",
                cert_file=str(gen.config.server.tls.cert_file),
                hint="renew server.tls.cert_file, then: systemctl reload vibectld",
            )

    async def _flush_usage(self) -> None:
        assert self.runtime is not None
        rt = self.runtime
        degraded = False
        while True:
            # While the database is away, counts stay in memory (per client and UTC day,
            # so bounded by the clients, not the calls) and each try may write them.
            await asyncio.sleep(RECOVERY_PROBE_SECONDS if degraded else FLUSH_INTERVAL_SECONDS)
            try:
                # A commit with synchronous=FULL waits for the disk: not on the event loop.
                await asyncio.to_thread(rt.registry.flush)
            except RegistryError:
                pass  # the counts are kept; health() says why, logged once below
            except Exception:
                log.exception("registry.flush_failed")
            with contextlib.suppress(RegistryError):  # a failure shows in health()
                await asyncio.to_thread(rt.registry.heartbeat, self._node(rt))
            if self._audit_trail.holding and not rt.registry.health().degraded:
                with contextlib.suppress(RegistryError):
                    await asyncio.to_thread(self._audit_trail.write_held, rt.registry)
            # Logged when the database stops answering and when it is back, not every beat.
            health = rt.registry.health()
            if health.degraded and not degraded:
                log.error(
                    "storage.degraded",
                    error=health.reason,
                    hint="admin changes fail until the database answers; "
                    + (
                        "calls are refused once this node's view is older than "
                        "storage.max_staleness (storage.on_stale: refuse)"
                        if rt.config.storage.on_stale == "refuse"
                        else "known clients are still served"
                    ),
                )
            elif degraded and not health.degraded:
                log.info(
                    "storage.recovered",
                    backend=rt.registry.backend,
                    # 0 once the calls counted during the outage are written.
                    unwritten_calls=rt.registry.pending_calls(),
                )
            degraded = health.degraded

    def _node(self, rt: Runtime) -> NodeInfo:
        """This node, as its heartbeat describes it to the others."""
        return NodeInfo(
            name=rt.config.server.name,
            address=rt.grpc_address,
            version=__version__,
            in_flight=rt.inflight.total(),
            started_at=int(rt.started_at),
            heartbeat_at=int(time.time()),
        )

    def _changed(self, record: ClientRecord) -> None:
        """Another node changed a client: if it is no longer active, end its calls here."""
        assert self.runtime is not None
        if record.status(int(time.time())) != "active":
            cancelled = self.runtime.inflight.cancel_client(record.id)
            log.info("client.changed_elsewhere", client=record.name, cancelled_calls=cancelled)

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_until_stopped(self) -> None:
        await self._stop.wait()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let calls finish within `grace` seconds, then cancel the rest."""
        grace = self.config.server.shutdown_grace_seconds if grace is None else grace
        self.notifier.stopping()
        log.info("stopping", grace_seconds=grace)
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self._drain()
        if self._admin is not None:
            await self._admin.close()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.runtime is not None:
            await self.runtime.cancel_background()
            self.runtime.metrics.close()
            await self.runtime.generation.catalogue.aclose()
            self.runtime.executor.close()
            try:
                self.runtime.registry.close()
            except RegistryError as e:
                log.error(
                    "registry.close_failed", error=str(e), hint="recent usage counts were lost"
                )
        log.info("stopped")

    async def _drain(self) -> None:
        """Answer calls that gRPC has queued but not yet handed over with UNAVAILABLE.

        grpc.aio hands a handler one waiting call per method at a time; stopping the
        server drops the rest with CANCELLED, which clients cannot tell from their own
        cancellation. Refusing them first gives every one a status that says "retry".
        """
        if self.runtime is None:
            return
        self.runtime.draining = True
        deadline = time.monotonic() + DRAIN_MAX_SECONDS
        while time.monotonic() < deadline:
            if time.monotonic() - self.runtime.last_arrival >= DRAIN_QUIET_SECONDS:
                break
            await asyncio.sleep(0.02)

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        try:
            await self.start()
            await self.serve_until_stopped()
        finally:
            await self.stop()
