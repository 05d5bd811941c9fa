"""The daemon's lifecycle: start() → serve_until_stopped() → stop(grace).

Signal handlers only set events; the lifecycle coroutine acts on them.
READY=1 goes out only once the TLS port and the admin socket are bound and the
registry is loaded.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import signal
import time
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.admin.routes import build_routes
from vibectld.admin.server import AdminServer, Caller
from vibectld.config import (
    ConfigError,
    DaemonConfig,
    keep_restart_only,
    load_config,
    restart_only_changes,
)
from vibectld.generation import GenerationRejected, build_generation
from vibectld.ops.notify import Notifier
from vibectld.ops.watchdog import Heartbeat, Probe
from vibectld.pki import cluster
from vibectld.pki.sealed import ClusterKey, ClusterKeyError
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import CertificateAuthority, ServerTLS, default_hosts
from vibectld.providers.catalogue import ModelCatalogue, point_llm_at
from vibectld.providers.execution import Executor
from vibectld.providers.keys import ProviderKeys
from vibectld.runtime import Runtime
from vibectld.service.interceptor import CallGate, FailedAuthLog
from vibectld.service.servicer import ProxyService
from vibectld.service.staleness import StorageState, shares_store, status_note, storage_state
from vibectld.store.base import NodeInfo
from vibectld.store.journal import DIRECTORY as USAGE_JOURNAL
from vibectld.store.registry import ClientRecord, Registry, RegistryError
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
# Audit rows of admin operations kept while the database is away, written when it
# answers; past this the oldest are dropped (the journal has every one).
MAX_HELD_AUDIT_ROWS = 1000
# How often the served certificate's expiry is looked at (renewal starts 30 days ahead).
CERTIFICATE_CHECK_SECONDS = 6 * 3600.0
# How long arrivals must pause before the server stops, and the most a drain may take.
DRAIN_QUIET_SECONDS = 0.1
DRAIN_MAX_SECONDS = 1.0
# Over server.max_request_bytes, what gRPC itself still receives so that the service can
# refuse it with its own message; gRPC refuses anything larger itself.
RECEIVE_MARGIN_BYTES = 64 * 1024
HANDSHAKE_TIMEOUT_MS = 10_000
# The credential holding storage.backend: postgresql's libpq connection string.
DSN_CREDENTIAL = "postgresql-dsn"


class StartupError(Exception):
    """The daemon cannot start; the message names the cause and the fix."""


def _certificate_configuration(tls: ServerTLS) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key_pem, tls.cert_chain_pem)], root_certificates=tls.client_ca_pem
    )


def _server_credentials(rt: Runtime) -> grpc.ServerCredentials:
    """TLS credentials that pick up reloaded certificates on the next handshake."""
    served = rt.generation.tls

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        current = rt.generation.tls
        if current is served:
            return None  # unchanged: gRPC keeps what it has
        served = current
        return _certificate_configuration(served)

    return grpc.dynamic_ssl_server_credentials(
        _certificate_configuration(served),
        fetch,
        require_client_authentication=served.client_ca_pem is not None,
    )


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
        # Audit rows waiting for the database (appended from the admin server's threads).
        self._held_audit: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MAX_HELD_AUDIT_ROWS
        )

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
        config = self.config
        state_dir = config.state_dir
        try:
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise StartupError(
                f"cannot create state_dir {state_dir}: {e.strerror}; create it for the "
                "vibectld user or set state_dir"
            ) from None
        point_llm_at(state_dir)
        ca: CertificateAuthority | None = None
        if config.storage.backend == "sqlite":
            signing = SigningKeys.load_or_create(state_dir / "signing-keys")
            registry = _open_registry(config)
        else:
            # Several nodes: the signing keys and the CA are the cluster's, in its database.
            registry = _open_registry(config)
            try:
                signing, ca = _join_cluster(config, registry)
            except BaseException:
                registry.close()
                raise
        try:
            generation = build_generation(config, signing, registry, ca=ca)
        except GenerationRejected as e:
            registry.close()
            raise StartupError(str(e)) from None
        executor = Executor(config.models.sync_workers)
        rt = Runtime(generation=generation, signing=signing, registry=registry, executor=executor)
        if signing.shared:
            _follow_signing_keys(rt, asyncio.get_running_loop())
        if registry.shared:
            # rpm and concurrency across the nodes (psycopg: only a shared store imports it).
            from vibectld.service.cluster_limits import limit_across_nodes

            limit_across_nodes(rt, registry)
        return rt

    # A worker binds the port its main process chose, beside the other workers
    # (SO_REUSEPORT: the kernel spreads connections over them); a lone daemon does not.
    _reuse_port = 0

    def _listen_address(self) -> str:
        return self.config.server.listen

    async def _start_grpc(self, rt: Runtime) -> None:
        listen = self._listen_address()
        limit = self.config.server.max_request_bytes
        failed_auth = FailedAuthLog()
        server = grpc.aio.server(
            # Authentication and the server-wide cap, from the headers alone: a refused
            # call's message is never read (service/interceptor.py).
            interceptors=[CallGate(rt, failed_auth)],
            options=[
                # gRPC refuses larger messages itself, with RESOURCE_EXHAUSTED; the margin
                # lets the service answer a request just over the limit with its own
                # INVALID_ARGUMENT that says what to do.
                ("grpc.max_receive_message_length", limit + RECEIVE_MARGIN_BYTES),
                ("grpc.max_send_message_length", max(4 * limit, 4 * 1024 * 1024)),
                # A connection that has not finished its TLS handshake by then is closed
                # (gRPC's default is 120 s, long enough to hold thousands of idle sockets).
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
                ("grpc.so_reuseport", self._reuse_port),
                # Without BDP probing, a stream's receive window stays small until the
                # service asks for its message; with it, gRPC widens the window and a
                # refused call's client pushes megabytes that are received and thrown
                # away (1,000 refused 3.9 MB requests: +3 MB RSS, against +85 MB). An
                # accepted call's message is asked for at once, so its window opens to
                # the message's size: no slower on loopback.
                ("grpc.http2.bdp_probe", 0),
            ],
        )
        pb_grpc.add_VibectlLLMProxyServicer_to_server(ProxyService(rt, failed_auth), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        busy = (
            f"cannot listen on {listen}; is another process using the port? "
            "change server.listen or stop it"
        )
        try:
            port = server.add_secure_port(listen, _server_credentials(rt))
        except RuntimeError as e:
            raise StartupError(f"{busy} ({e})") from None
        if not port:
            raise StartupError(busy)
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
        path = self.config.config_path
        try:
            fresh = load_config(path) if path is not None else old.config
        except ConfigError as e:
            raise GenerationRejected(str(e)) from None
        changed = restart_only_changes(old.config, fresh)
        config = keep_restart_only(old.config, fresh)
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
        """Commit an audit row; with a shared database that is away, keep it for later.

        Waiting on a database that does not answer would hold the admin caller's answer
        up to a connection timeout; the journal already has the record.
        """
        assert self.runtime is not None
        registry = self.runtime.registry
        if not shares_store(registry):
            registry.add_audit(**row)  # SQLite: a failure is the caller's to log
            return
        if not registry.health().degraded and not self._held_audit:
            with contextlib.suppress(RegistryError):
                registry.add_audit(**row)
                return
        if len(self._held_audit) == self._held_audit.maxlen:
            log.warning(
                "audit.held_dropped",
                hint=f"more than {MAX_HELD_AUDIT_ROWS} audit rows waited for the database; "
                "the oldest is in the journal only",
            )
        self._held_audit.append(row)

    def _write_held_audit(self) -> None:
        """Write the audit rows kept while the database was away, oldest first; stop at the
        first failure (the rest wait for the next try). From a thread."""
        assert self.runtime is not None
        while self._held_audit:
            self.runtime.registry.add_audit(**self._held_audit[0])
            self._held_audit.popleft()

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
            if self._held_audit and not rt.registry.health().degraded:
                with contextlib.suppress(RegistryError):
                    await asyncio.to_thread(self._write_held_audit)
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


def _open_registry(config: DaemonConfig) -> Registry:
    """The configured store, opened and loaded (StartupError, StorageFailure, ...)."""
    # Every counted call is also journaled here at once: a kill loses none (journal.py).
    journal = config.state_dir / USAGE_JOURNAL
    if config.storage.backend == "sqlite":
        return Registry.open(config.state_dir / "registry.db", journal=journal)
    credentials = ProviderKeys.for_credentials(config.config_dir)
    dsn = credentials.get(DSN_CREDENTIAL)
    if dsn is None:
        places = " or ".join(str(p) for p in credentials.places(DSN_CREDENTIAL))
        if credentials.credentials_dir is None:
            places += " (or $CREDENTIALS_DIRECTORY/postgresql-dsn through LoadCredential=)"
        raise StartupError(
            "storage.backend is postgresql, but the postgresql-dsn credential is missing: "
            f"put a libpq connection string in {places}"
        )
    return Registry.open_postgresql(dsn, journal=journal)


# The credential holding the key that seals the cluster's private keys in its database.
CLUSTER_KEY_CREDENTIAL = "cluster-key"


def _join_cluster(
    config: DaemonConfig, registry: Registry
) -> tuple[SigningKeys, CertificateAuthority]:
    """This node's cluster key, checked against the database; the cluster's signing keys
    and CA, created there if this node is the first (StartupError naming the fix)."""
    credentials = ProviderKeys.for_credentials(config.config_dir)
    text = credentials.get(CLUSTER_KEY_CREDENTIAL)
    if text is None:
        places = " or ".join(str(p) for p in credentials.places(CLUSTER_KEY_CREDENTIAL))
        if credentials.credentials_dir is None:
            places += " (or $CREDENTIALS_DIRECTORY/cluster-key through LoadCredential=)"
        raise StartupError(
            "storage.backend is postgresql, but the cluster-key credential is missing: make "
            "one once with `vibectld --generate-cluster-key` and put the same file on every "
            f"node, in {places}"
        )
    first_host = default_hosts(config.server.public_host)[0]
    try:
        key = ClusterKey.parse(text)
        ca = cluster.join(registry, key, first_host)
        signing = SigningKeys(cluster.DatabaseKeys(registry, key))
    except ClusterKeyError as e:
        raise StartupError(str(e)) from None
    return signing, ca


def _follow_signing_keys(rt: Runtime, loop: asyncio.AbstractEventLoop) -> None:
    """Reload the signing keys as the change feed brings a rotation or retirement from any
    node; a key retired elsewhere ends its clients' calls here too, as on the node that
    retired it."""

    def cancel(kids: frozenset[str]) -> None:
        for kid in sorted(kids):
            clients = rt.registry.active_signed_by(kid)
            cancelled = sum(rt.inflight.cancel_client(record.id) for record in clients)
            log.info(
                "signing_key.retired_elsewhere",
                kid=kid,
                active_clients=len(clients),
                cancelled_calls=cancelled,
            )

    def on_retired(kids: frozenset[str]) -> None:
        # From the reload's thread: the calls in flight belong to the loop. A loop already
        # closed has no calls left to end.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(cancel, kids)

    rt.registry.on_key_change(cluster.KeyFollower(rt.signing, on_retired).changed)
