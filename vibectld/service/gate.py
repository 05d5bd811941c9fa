"""The door of the gRPC port: refuse from the metadata, before a message is read.

grpc.aio looks up a call's handler when its headers have arrived and before it
receives the request message. `CallGate` is where it looks: the services are added
to the gate, not to the server, and the gate, asked for a handler, authenticates from
the `authorization` metadata alone and counts the call against the
server-wide cap (`server.max_concurrent_calls`). A refused call gets a handler
that aborts without ever iterating its request stream, so the message (up to
gRPC's receive limit) is never received into Python nor deserialized: a flood of
large requests with a bad secret costs the daemon about what its headers cost.

The servicer authenticates again, against the generation it runs under (a
verified signature is cached, so that is a dict hit and a registry read): the
gate is an early refusal, the servicer's check is the one that decides.

A node whose view of the shared store is stale, with `storage.on_stale: refuse`,
refuses every call of the service here with UNAVAILABLE, before authenticating: it
cannot vouch for a secret (revoked on another node, or issued there since), and the
status tells the client to retry, where another node may answer (service/staleness.py).

A handler lookup rather than a grpc.aio ServerInterceptor: an interceptor runs each
call through grpc's interceptor pipeline (coroutines per call), which cost a bare
server 19% of its unary calls per second on this 2-core machine (1,972 -> 1,602 at 16
callers, a pass-through interceptor); the lookup is one synchronous call, made in the
call's own task, that grpc makes anyway.

The standard health service stays open: the watchdog and load balancers call
it without a secret, and its `Check` is not counted against the cap, so a
daemon at its cap still reports itself serving.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import structlog

from vibectld.runtime import Runtime
from vibectld.service.refusals import CallRefused, LimitExceeded, abort
from vibectld.service.staleness import is_stale, stale_refusal

log = structlog.get_logger("vibectld.auth")

PROXY_METHOD_PREFIX = "/vibectl.llm_proxy.VibectlLLMProxy/"
_UNCOUNTED = frozenset({"/grpc.health.v1.Health/Check"})
# A full server has no single call to wait for; a second lets some of them end.
SERVER_RETRY_MS = 1000


class FailedAuthLog:
    """Logs refused secrets with peer and reason, at most one record per peer per period.

    A peer is its address without the port (each connection has its own). The
    record after a quiet period says how many were suppressed. Across all
    peers at most `max_peers` records are written per period, so a flood from
    many addresses cannot fill the journal either. The secret is never logged:
    the reason is the refusal's message, which never quotes it.
    """

    def __init__(
        self,
        period: float = 60.0,
        max_peers: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._period = period
        self._max_peers = max_peers
        self._clock = clock
        # peer host -> [when its last record was written, refusals suppressed since]
        self._peers: OrderedDict[str, list[float]] = OrderedDict()
        self._window_start = clock()
        self._window_records = 0
        self._dropped = 0

    def refused(self, peer: str, reason: str) -> None:
        now = self._clock()
        host = peer.rpartition(":")[0] or peer
        seen = self._peers.get(host)
        if seen is not None and now - seen[0] < self._period:
            seen[1] += 1
            return
        if now - self._window_start >= self._period:
            self._window_start, self._window_records = now, 0
        if self._window_records >= self._max_peers:
            self._dropped += 1
            return
        self._window_records += 1
        suppressed = int(seen[1]) if seen is not None else 0
        self._peers[host] = [now, 0]
        self._peers.move_to_end(host)
        while len(self._peers) > 4 * self._max_peers:
            self._peers.popitem(last=False)
        dropped, self._dropped = self._dropped, 0
        log.warning(
            "auth.refused",
            peer=peer,
            reason=reason,
            suppressed=suppressed,
            suppressed_other_peers=dropped,
        )


def _refusing_handler(
    refusal: CallRefused, streaming: bool, on_refused: Callable[[Any], None]
) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `refusal` and never reads its request.

    Declared request-streaming, so grpc.aio hands it a lazy iterator instead of
    receiving and deserializing the message first; it never iterates it.
    """

    async def refuse(requests: Any, context: Any) -> None:
        on_refused(context)
        await abort(context, refusal)

    if streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    return grpc.stream_unary_rpc_method_handler(refuse)


class CallGate(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Authenticates from metadata and applies the server-wide cap on concurrent calls.

    Services are added to it as to a server (`add_..._to_server(servicer, gate)`), then
    the gate to the server (`server.add_generic_rpc_handlers((gate,))`): no call reaches
    a service's handler but through `service`.
    """

    def __init__(self, runtime: Runtime, failed_auth: FailedAuthLog) -> None:
        self.rt = runtime
        self.failed_auth = failed_auth
        self.active = 0
        self._services: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._services.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: object) -> None:
        """Generated code also registers its methods with grpc's fast path; through the
        gate they are found by `service` (the same handlers), so there is nothing to do."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for found in self._services:
            if (handler := found.service(details)) is not None:
                return self._admit(details, handler)
        return None

    def _admit(
        self, details: grpc.HandlerCallDetails, handler: grpc.RpcMethodHandler
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method in _UNCOUNTED:
            return handler
        rt = self.rt
        if method.startswith(PROXY_METHOD_PREFIX):
            storage = rt.generation.config.storage
            if storage.on_stale == "refuse" and is_stale(
                rt.registry, storage.max_staleness_seconds, time.time()
            ):
                return self._refuse(stale_refusal(rt.registry), handler, _nothing)
            try:
                rt.generation.auth.authenticate(details.invocation_metadata)
            except CallRefused as refusal:
                return self._refuse(refusal, handler, self._log_failed_auth(refusal))
        cap = rt.generation.config.server.max_concurrent_calls
        if self.active >= cap:
            full = LimitExceeded(
                f"this server is handling its maximum of {cap} calls; retry in a moment",
                "server",
                SERVER_RETRY_MS,
            )
            return self._refuse(full, handler, _nothing)
        # The call is counted from here until its task ends, however it ends: served,
        # refused later, cancelled, or failed while its message was being received.
        task = asyncio.current_task()
        assert task is not None
        self.active += 1
        task.add_done_callback(self._release)
        # A worker's calls answer once their usage is recorded (workers/journal_files.py).
        return handler if rt.wrap_handler is None else rt.wrap_handler(method, handler)

    def _release(self, _: object) -> None:
        self.active -= 1

    def _log_failed_auth(self, refusal: CallRefused) -> Callable[[Any], None]:
        def note(context: Any) -> None:
            self.failed_auth.refused(context.peer(), refusal.message)

        return note

    def _refuse(
        self,
        refusal: CallRefused,
        handler: grpc.RpcMethodHandler,
        on_refused: Callable[[Any], None],
    ) -> grpc.RpcMethodHandler:
        self.rt.metrics.refusals.labels(refusal.reason).inc()
        return _refusing_handler(refusal, handler.response_streaming, on_refused)


def _nothing(_: Any) -> None:
    pass
