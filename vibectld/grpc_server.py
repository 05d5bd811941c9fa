"""The gRPC server the daemon serves calls on: its options, its TLS credentials (which
follow a reload's certificate), the proxy service and the health service.

Built here, started and stopped by daemon.py's lifecycle.
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.pki.tls import ServerTLS
from vibectld.runtime import Runtime
from vibectld.service.gate import CallGate, FailedAuthLog
from vibectld.service.servicer import ProxyService
from vibectld.startup import StartupError

# Over server.max_request_bytes, what gRPC itself still receives so that the service can
# refuse it with its own message; gRPC refuses anything larger itself.
RECEIVE_MARGIN_BYTES = 64 * 1024
HANDSHAKE_TIMEOUT_MS = 10_000


def build_server(
    rt: Runtime, max_request_bytes: int, reuse_port: int
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The server with the proxy and health services added; not yet bound or started."""
    limit = max_request_bytes
    failed_auth = FailedAuthLog()
    server = grpc.aio.server(
        options=[
            # gRPC refuses larger messages itself, with RESOURCE_EXHAUSTED; the margin
            # lets the service answer a request just over the limit with its own
            # INVALID_ARGUMENT that says what to do.
            ("grpc.max_receive_message_length", limit + RECEIVE_MARGIN_BYTES),
            ("grpc.max_send_message_length", max(4 * limit, 4 * 1024 * 1024)),
            # A connection that has not finished its TLS handshake by then is closed
            # (gRPC's default is 120 s, long enough to hold thousands of idle sockets).
            ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
            ("grpc.so_reuseport", reuse_port),
            # Without BDP probing, a stream's receive window stays small until the
            # service asks for its message; with it, gRPC widens the window and a
            # refused call's client pushes megabytes that are received and thrown
            # away (1,000 refused 3.9 MB requests: +3 MB RSS, against +85 MB). An
            # accepted call's message is asked for at once, so its window opens to
            # the message's size: no slower on loopback.
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    # Authentication and the server-wide cap, from the headers alone: a refused call's
    # message is never read. Both services are reached only through the gate
    # (service/gate.py).
    gate = CallGate(rt, failed_auth)
    pb_grpc.add_VibectlLLMProxyServicer_to_server(ProxyService(rt, failed_auth), gate)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, gate)
    server.add_generic_rpc_handlers((gate,))
    return server, health_servicer


def bind(server: grpc.aio.Server, listen: str, rt: Runtime) -> int:
    """Bind `listen` with TLS; the port bound (StartupError if it cannot be)."""
    busy = (
        f"cannot listen on {listen}; is another process using the port? "
        "change server.listen or stop it"
    )
    try:
        port: int = server.add_secure_port(listen, _server_credentials(rt))
    except RuntimeError as e:
        raise StartupError(f"{busy} ({e})") from None
    if not port:
        raise StartupError(busy)
    return port


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
