"""One serving process under a main process: gRPC on the shared port, nothing else.

Started by the main process as the same command with `--worker-fd N` added (a fresh
interpreter: nothing that has started gRPC or threads is ever forked). It reads no
configuration file: the main process sends its current configuration, from which the
worker builds its own generation (TLS material, catalogue, provider keys, read from the
same places), with the client records and signing keys (workers/view.py); a reload
builds the next one from the file only when the main process asks (prepare, then swap).
It binds the main process's port with SO_REUSEPORT beside the other workers and serves
until the main process says drain (or SIGTERM, as systemd sends it to the whole unit).
It owns no admin socket, metrics endpoint, notification socket or store.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import time
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_private_key
from grpc_health.v1 import health_pb2

from vibectld.config import DaemonConfig, keep_restart_only
from vibectld.daemon import SERVICE_NAME, Daemon, _close_later
from vibectld.errors import STARTUP_ERRORS
from vibectld.generation import Generation, GenerationRejected, build_generation, reread_config
from vibectld.ops import logs
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import CertificateAuthority
from vibectld.providers.catalogue import point_llm_at
from vibectld.providers.execution import Executor
from vibectld.runtime import Runtime
from vibectld.startup import StartupError
from vibectld.store.base import Store
from vibectld.store.journal import DIRECTORY as USAGE_JOURNAL
from vibectld.store.records import ClientRecord
from vibectld.workers.channel import Channel
from vibectld.workers.journal_files import WorkerJournal, new_token, recorded_first
from vibectld.workers.view import ForwardedMetrics, PushedKeys, WorkerAdmission, WorkerStore

log = structlog.get_logger("vibectld.worker")

HELLO_TIMEOUT_SECONDS = 30.0


class Worker(Daemon):
    _reuse_port = 1

    def __init__(self, config: DaemonConfig, sock: socket.socket) -> None:
        super().__init__(config)
        self._sock = sock
        self.channel = Channel(sock, self._handle, self._told)
        self.journal: WorkerJournal | None = None
        self._token = new_token()  # its usage files' name, told in the hello
        self.index = 0
        self._listen = config.server.listen
        self._store: WorkerStore | None = None
        self._keys: PushedKeys | None = None
        self._pending: Generation | None = None
        self._store_ready = asyncio.Event()
        self._workers = 1

    def _listen_address(self) -> str:
        return self._listen

    async def start(self) -> None:
        await self.channel.start()
        hello: dict[str, Any] = await self.channel.ask(
            "hello", (os.getpid(), self._token), within=HELLO_TIMEOUT_SECONDS
        )
        # No await from here to the event: pushes that follow the snapshot wait for it.
        self.index = hello["index"]
        self._listen = hello["listen"]
        self._keys = PushedKeys(hello["keys"])
        self._store = WorkerStore(hello["records"])
        self._store.channel = self.channel
        self._store_ready.set()
        self._workers = hello["workers"]
        # The main process's configuration, not the file's now: a worker started again
        # after the file changed serves what the others serve until a reload.
        self.config = config = _share_of(hello["config"], self._workers)
        self.journal = self._store.journal = WorkerJournal(
            config.state_dir / USAGE_JOURNAL, self._token
        )
        logs.configure(config.logging.level, config.logging.format)
        # Every record this worker logs says which worker (its calls' tasks inherit it).
        structlog.contextvars.bind_contextvars(worker=self.index)
        self.runtime = rt = self._open_worker_state(hello)
        await self._start_grpc(rt)
        assert self._health is not None
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._watch_channel(), name="channel"))
        log.info("worker.serving", worker=self.index, pid=os.getpid(), listen=rt.grpc_address)
        await self.channel.ask("serving", os.getpid(), within=HELLO_TIMEOUT_SECONDS)

    def _open_worker_state(self, hello: dict[str, Any]) -> Runtime:
        assert self._store is not None and self._keys is not None
        config = self.config
        point_llm_at(config.state_dir)
        signing = SigningKeys(self._keys)
        ca = _ca_from_wire(hello["ca"])
        store: Store = self._store  # type: ignore[assignment]  # the request path's part
        try:
            generation = build_generation(config, signing, store, hello["generation"], ca=ca)
        except GenerationRejected as e:
            raise StartupError(str(e)) from None
        executor = Executor(config.models.sync_workers)
        rt = Runtime(
            generation=generation,
            signing=signing,
            registry=store,
            executor=executor,
            metrics=ForwardedMetrics(self.channel),
        )
        rt.cluster = WorkerAdmission(self.channel, self._store, rt)
        rt.wrap_handler = recorded_first(self.channel.flush)
        return rt

    async def _watch_channel(self) -> None:
        # The main process is gone (killed, crashed): a worker alone serves no one well.
        await self.channel.closed.wait()
        if self.runtime is not None:
            # New calls are refused (UNAVAILABLE, retryable) at once: no limit or budget
            # can be decided, and a client retries them on the next daemon. Calls running
            # finish, their usage in this worker's files for the next start to count.
            self.runtime.draining = True
        if not self._stop.is_set():
            log.error("worker.main_process_gone", worker=self.index, hint="stopping")
            self.request_stop()

    def _told(self, kind: str, body: Any) -> None:
        """What the main process sends without waiting for an answer."""
        if kind == "journalled":
            if self.journal is not None:
                self.journal.journalled(body)  # only to delete its files
        elif kind == "drain":
            self.request_stop()
        else:
            raise ValueError(f"unknown message {kind!r}")

    async def _handle(self, kind: str, body: Any) -> Any:
        await self._store_ready.wait()
        assert self._store is not None
        if kind == "client":
            return self._client_changed(body)
        if kind == "keys":
            return self._keys_changed(body)
        if kind == "ping":
            return self._ping()
        if kind == "prepare":
            return self._prepare()
        if kind == "swap":
            return self._swap()
        if kind == "abandon":
            self._pending = None
            return None
        raise ValueError(f"unknown message {kind!r}")

    def _client_changed(self, record: ClientRecord) -> int:
        """Take the main process's record; a client no longer active loses its calls here."""
        assert self._store is not None
        self._store.put(record)
        rt = self.runtime
        if rt is None or record.status(int(time.time())) == "active":
            return 0
        return rt.inflight.cancel_client(record.id)

    def _keys_changed(self, wire: Any) -> int:
        assert self._keys is not None and self._store is not None
        self._keys.replace(wire)
        rt = self.runtime
        if rt is None:
            return 0
        retired = rt.signing.refresh()
        return sum(
            rt.inflight.cancel_client(r.id)
            for kid in retired
            for r in self._store.active_signed_by(kid)
        )

    def _ping(self) -> dict[str, Any]:
        """Proof for the watchdog: this loop runs, and its gRPC server is started and not
        shutting down (a health check over the shared port may reach another worker)."""
        rt = self.runtime
        server = self._grpc
        serving = rt is not None and server is not None and not rt.draining
        return {
            "serving": serving,
            "per_client": dict(rt.inflight.per_client()) if rt is not None else {},
            "generation": rt.generation.number if rt is not None else 0,
        }

    def _prepare(self) -> int:
        """Build the next generation from the file, as the main process did; keep it."""
        assert self.runtime is not None
        rt = self.runtime
        old = rt.generation
        fresh = reread_config(self.config.config_path, old.config)
        config = _share_of(keep_restart_only(old.config, fresh, self.config), self._workers)
        self._pending = build_generation(config, rt.signing, rt.registry, old.number + 1, ca=old.ca)
        return self._pending.number

    def _swap(self) -> int:
        assert self.runtime is not None and self._pending is not None
        rt = self.runtime
        old, rt.generation, self._pending = rt.generation, self._pending, None
        grace = rt.generation.config.limits.request_timeout_seconds + 5
        rt.background(_close_later(old.catalogue, grace))
        log.info("worker.reloaded", worker=self.index, generation=rt.generation.number)
        return rt.generation.number

    async def stop(self, grace: float | None = None) -> None:
        await super().stop(grace)
        await self.channel.close()
        if self.journal is not None:
            self.journal.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        # Reloads are the main process's to coordinate (every worker or none).
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        try:
            await self.start()
            await self.serve_until_stopped()
        finally:
            await self.stop()


def _share_of(config: DaemonConfig, workers: int) -> DaemonConfig:
    """`config` with this worker's share of the server-wide cap on calls in flight (each
    worker's call gate counts its own calls; the shares add up to the cap, rounded up)."""
    cap = config.server.max_concurrent_calls
    server = dataclasses.replace(config.server, max_concurrent_calls=-(-cap // workers))
    return dataclasses.replace(config, server=server)


def _ca_from_wire(wire: tuple[bytes, bytes, str] | None) -> CertificateAuthority | None:
    if wire is None:
        return None
    cert_der, key_der, where = wire
    key = load_der_private_key(key_der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return CertificateAuthority(x509.load_der_x509_certificate(cert_der), key, where)


def run_worker(fd: int) -> int:
    """The worker's whole life (from `vibectld --worker-fd`); its exit status."""
    sock = socket.socket(fileno=fd)
    # Until the main process sends its configuration: the defaults (logs to stderr).
    logs.configure()
    try:
        asyncio.run(Worker(DaemonConfig(), sock).run())
    except STARTUP_ERRORS as e:
        log.error("worker.start_failed", error=str(e))
        return 1
    except KeyboardInterrupt:
        pass
    return 0
