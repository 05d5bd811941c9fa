"""The heartbeat: systemd's watchdog and STATUS= line, sent only while we really serve.

WATCHDOG=1 goes out only after a real gRPC health check against our own TLS
port answered, from a task on the event loop. A wedged loop sends nothing, and
neither does a gRPC server that stopped answering; either way systemd restarts the
service when WatchdogSec= passes. An answer of NOT_SERVING counts as alive: the
daemon says that itself while its database is away and it refuses calls
(storage.on_stale: refuse), and a restart would not bring the database back — it
would only stop the node at start, unable to load its store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import structlog
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vibectld.ops.notify import Notifier
from vibectld.runtime import Runtime

log = structlog.get_logger("vibectld")

STATUS_INTERVAL_SECONDS = 5.0


def _dial_target(rt: Runtime) -> str:
    return rt.grpc_address if rt.dialable_host() else f"127.0.0.1:{rt.grpc_port}"


def _name_in_certificate(chain_pem: bytes) -> str:
    """A DNS name the server certificate is valid for, to verify our own TLS against."""
    cert = x509.load_pem_x509_certificate(chain_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    return "localhost" if "localhost" in names else (names[0] if names else "localhost")


# Given the seconds it may take, True when calls are being served.
Probe = Callable[[float], Awaitable[bool]]


class Heartbeat:
    def __init__(
        self,
        rt: Runtime,
        notifier: Notifier,
        status: Callable[[], str],
        probe: Probe | None = None,
    ) -> None:
        self.rt = rt
        self.notifier = notifier
        self.status = status
        # A main process with workers proves each of them instead (workers/supervisor.py):
        # a health check over the shared port would reach one worker, not all.
        self.probe: Probe = probe or self._grpc_answers
        self.watchdog_interval = notifier.watchdog_interval()

    async def _grpc_answers(self, deadline_seconds: float) -> bool:
        rt = self.rt
        tls = rt.generation.tls
        if tls.client_ca_pem is not None:
            # With mTLS we hold no client certificate; the loop running is the proof we have.
            return True
        creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem)
        options = [("grpc.ssl_target_name_override", _name_in_certificate(tls.cert_chain_pem))]
        async with grpc.aio.secure_channel(_dial_target(rt), creds, options=options) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=deadline_seconds)
            except grpc.aio.AioRpcError as e:
                log.warning("watchdog.health_check_failed", code=e.code().name)
                return False
        return bool(
            reply.status
            in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
        )

    async def run(self) -> None:
        interval = min(self.watchdog_interval or STATUS_INTERVAL_SECONDS, STATUS_INTERVAL_SECONDS)
        while True:
            await asyncio.sleep(interval)
            self.notifier.status(self.status())
            if self.watchdog_interval is not None and await self.probe(interval):
                self.notifier.watchdog()
