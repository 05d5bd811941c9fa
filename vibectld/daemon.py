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

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.admin.routes import build_routes
from vibectld.admin.server import AdminServer, Caller
from vibectld.config import DaemonConfig
from vibectld.ops.notify import Notifier
from vibectld.ops.watchdog import Heartbeat
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import ServerTLS, default_hosts, load_server_tls
from vibectld.providers.catalogue import ModelCatalogue, point_llm_at
from vibectld.providers.execution import Executor
from vibectld.providers.keys import ProviderKeys
from vibectld.reloader import ReloadRejected, reload_runtime
from vibectld.runtime import Runtime
from vibectld.service.servicer import ProxyService
from vibectld.store.registry import Registry, RegistryError

log = structlog.get_logger("vibectld")

SERVICE_NAME = "vibectl.llm_proxy.VibectlLLMProxy"
FLUSH_INTERVAL_SECONDS = 2.0
# How long arrivals must pause before the server stops, and the most a drain may take.
DRAIN_QUIET_SECONDS = 0.1
DRAIN_MAX_SECONDS = 1.0


class StartupError(Exception):
    """The daemon cannot start; the message names the cause and the fix."""


def _certificate_configuration(tls: ServerTLS) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(tls.key_pem, tls.cert_chain_pem)], root_certificates=tls.client_ca_pem
    )


def _server_credentials(rt: Runtime) -> grpc.ServerCredentials:
    """TLS credentials that pick up reloaded certificates on the next handshake."""
    served = rt.tls

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        if rt.tls is served:
            return None  # unchanged: gRPC keeps what it has
        served = rt.tls
        return _certificate_configuration(served)

    return grpc.dynamic_ssl_server_credentials(
        _certificate_configuration(served),
        fetch,
        require_client_authentication=served.client_ca_pem is not None,
    )


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

    @property
    def grpc_port(self) -> int:
        assert self.runtime is not None
        return self.runtime.grpc_port

    async def start(self) -> None:
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
        tls = load_server_tls(
            config.server.tls, state_dir, default_hosts(config.server.public_host)
        )
        signing = SigningKeys.load_or_create(state_dir / "signing-keys")
        registry = Registry.open(state_dir / "registry.db")
        provider_keys = ProviderKeys.for_daemon(config.config_dir, state_dir)
        catalogue = ModelCatalogue.build(config.models, provider_keys)
        executor = Executor(config.models.sync_workers, provider_keys.redact)
        rt = Runtime(
            config=config,
            catalogue=catalogue,
            signing=signing,
            registry=registry,
            executor=executor,
            provider_keys=provider_keys,
            tls=tls,
        )
        self.runtime = rt

        limit = config.server.max_request_bytes
        # gRPC itself refuses larger messages with RESOURCE_EXHAUSTED; leaving it
        # headroom lets the service answer "too large" with INVALID_ARGUMENT.
        grpc_limit = max(4 * limit, 4 * 1024 * 1024)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", grpc_limit),
                ("grpc.max_send_message_length", grpc_limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_VibectlLLMProxyServicer_to_server(ProxyService(rt), server)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        try:
            port = server.add_secure_port(config.server.listen, _server_credentials(rt))
        except RuntimeError as e:
            raise StartupError(
                f"cannot listen on {config.server.listen} ({e}); is another process using "
                "the port? change server.listen or stop it"
            ) from None
        if not port:
            raise StartupError(
                f"cannot listen on {config.server.listen}; is another process using the "
                "port? change server.listen or stop it"
            )
        host = config.server.listen.rpartition(":")[0]
        rt.grpc_host, rt.grpc_port = host, port
        await server.start()
        self._grpc = server

        routes = build_routes(rt, self.reload, self.request_reload)
        self._admin = AdminServer(
            config.admin.socket, config.admin.group, routes, on_audit=self._audit
        )
        await self._admin.start()
        if config.metrics.listen is not None:
            try:
                rt.metrics.serve(config.metrics.listen)
            except OSError as e:
                raise StartupError(
                    f"cannot serve metrics on {config.metrics.listen}: {e.strerror}; change "
                    "metrics.listen or stop the process using it"
                ) from None

        # Everything loaded so far (the registry's records, llm and its plugins) lives as
        # long as the daemon: taken out of the cyclic GC, a full collection no longer walks
        # 100,000 client records while calls wait behind it.
        gc.collect()
        gc.freeze()
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._flush_usage(), name="flush-usage"))
        self._tasks.append(asyncio.create_task(self._reload_on_request(), name="reload"))
        heartbeat = Heartbeat(rt, self.notifier, self._status_line)
        self._tasks.append(asyncio.create_task(heartbeat.run(), name="heartbeat"))
        if config.server.public_url is None:
            log.warning(
                "server.public_url_unset",
                hint="issued URLs use this machine's name; set server.public_url to the "
                "address clients dial",
            )
        counts = registry.counts()
        log.info(
            "started",
            listen=rt.grpc_address,
            admin_socket=str(config.admin.socket),
            models=len(catalogue.entries()),
            clients=counts["active"],
            ca_sha256=tls.ca_sha256,
            pid=os.getpid(),
        )
        self.notifier.ready(self._status_line())

    def _status_line(self) -> str:
        rt = self.runtime
        if rt is None:
            return "starting"
        line = (
            f"serving on {rt.grpc_address}; {rt.registry.counts()['active']} active clients; "
            f"{rt.inflight.total()} in flight"
        )
        if self._last_reload_error:
            line += f"; last reload rejected: {self._last_reload_error}"
        return line

    async def reload(self) -> list[str]:
        """Reload config, certificates, keys, models and limits; raise ReloadRejected if invalid.

        Returns notes about settings that only a restart applies.
        """
        assert self.runtime is not None
        async with self._reload_lock:
            self.notifier.reloading()
            log.info("reload.started")
            try:
                notes = reload_runtime(self.runtime, self.config.config_path)
            except ReloadRejected as e:
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

    def _audit(self, caller: Caller, op: str, target: str | None, outcome: str) -> None:
        assert self.runtime is not None
        self.runtime.registry.add_audit(
            at=int(time.time()),
            caller_uid=caller.uid,
            caller_user=caller.user,
            op=op,
            target=target,
            outcome=outcome,
        )

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
            try:
                await asyncio.to_thread(
                    self.runtime.registry.add_audit,
                    at=int(time.time()),
                    caller_uid=None,
                    caller_user="SIGHUP",
                    op="reload",
                    target=None,
                    outcome="requested",
                )
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
            with contextlib.suppress(ReloadRejected):
                await self.reload()

    async def _flush_usage(self) -> None:
        assert self.runtime is not None
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
            try:
                # A commit with synchronous=FULL waits for the disk: not on the event loop.
                await asyncio.to_thread(self.runtime.registry.flush)
            except Exception:
                log.exception("registry.flush_failed")

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
            await self.runtime.catalogue.aclose()
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
