"""ProxyModelAdapter: model calls through vibectld over gRPC.

One channel per process, a deadline on every call, jittered backoff on
UNAVAILABLE, `retry-after-ms` honoured on RESOURCE_EXHAUSTED, and exactly one
function mapping gRPC statuses to the client's error types. This module must
not import llm or pydantic: proxy mode starts fast.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.adapters.base import LLMMetrics, ModelAdapter, Prompt
from vibectl.errors import (
    AuthenticationError,
    InvalidRequestError,
    LimitExceededError,
    ModelError,
    PermissionDeniedError,
    ServerUnavailableError,
    VibectlError,
)
from vibectl.util.hostport import join_host_port

T = TypeVar("T")

MAX_ATTEMPTS = 4
BACKOFF_BASE_SECONDS = 0.2
# Waiting longer than this for a limit to clear is the caller's decision, not ours.
MAX_RETRY_AFTER_SECONDS = 5.0


def error_from_rpc(err: grpc.aio.AioRpcError, target: str, timeout: float) -> VibectlError:
    """The one mapping from a gRPC status to a client error."""
    code, details = err.code(), err.details() or ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(f"vibectld at {target} refused the secret: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers = dict(err.trailing_metadata() or ())
        if "limit-type" not in trailers:
            # Not a limit of vibectld's (those always say which): gRPC's own receive limit
            # refused a message too large to read. Retrying the same request cannot help.
            return InvalidRequestError(
                f"vibectld refused the request as too large ({details}); send a shorter prompt"
            )
        retry_after = trailers.get("retry-after-ms")
        return LimitExceededError(
            details or "a server limit was reached; retry later",
            str(trailers["limit-type"]),
            int(retry_after) if isinstance(retry_after, str) and retry_after.isdigit() else None,
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(f"vibectld rejected the request: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerUnavailableError(
            f"vibectld at {target} did not answer within {timeout:g} s; try again, or raise "
            "the profile's timeout_seconds"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerUnavailableError(f"cannot reach vibectld at {target}: {_first_line(details)}")
    return VibectlError(f"vibectld at {target} failed: {code.name}: {details}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no answer"


def _metrics(m: pb.ExecutionMetrics, model: str, started: float) -> LLMMetrics:
    return LLMMetrics(
        latency_ms=(time.monotonic() - started) * 1000,
        token_input=m.input_tokens if m.HasField("input_tokens") else None,
        token_output=m.output_tokens if m.HasField("output_tokens") else None,
        cost_usd=m.cost_usd if m.HasField("cost_usd") else None,
        model=model,
    )


def _retry_delay(code: grpc.StatusCode, error: VibectlError, attempt: int) -> float | None:
    """Seconds to wait before the next attempt, or None when retrying cannot help."""
    if code == grpc.StatusCode.UNAVAILABLE:
        jitter: float = random.uniform(0.5, 1.5)  # noqa: S311
        return BACKOFF_BASE_SECONDS * float(2 ** (attempt - 1)) * jitter
    if isinstance(error, LimitExceededError) and error.retry_after_ms is not None:
        wait = error.retry_after_ms / 1000
        if wait <= MAX_RETRY_AFTER_SECONDS:
            return wait + random.uniform(0, 0.05)  # noqa: S311
    return None


def _model_error(err: pb.ExecuteError) -> ModelError:
    details = err.error_details if err.HasField("error_details") else None
    return ModelError(err.error_code, err.error_message, details)


class ProxyModelAdapter(ModelAdapter):
    mode = "proxy"

    def __init__(
        self,
        host: str,
        port: int,
        secret: str,
        *,
        ca_pem: bytes | None = None,
        insecure: bool = False,
        timeout: float = 60.0,
        connect_timeout: float = 10.0,
        explain_failure: Callable[[float], VibectlError | None] | None = None,
    ) -> None:
        self.target = join_host_port(host, port)
        self._secret = secret
        self._ca_pem = ca_pem
        self._insecure = insecure
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        # Given the seconds it may take, the error that explains a failed connection
        # better than "unreachable" (the server no longer presents the pinned CA, or
        # fails the profile's CA file), or None.
        self._explain_failure = explain_failure
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.VibectlLLMProxyStub | None = None
        self._info: pb.GetServerInfoResponse | None = None

    def __repr__(self) -> str:
        return f"ProxyModelAdapter({self.target})"

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self._secret}"),)

    async def _connect(self) -> pb_grpc.VibectlLLMProxyStub:
        if self._stub is None:
            options = [
                ("grpc.enable_retries", 0),
                ("grpc.keepalive_time_ms", 60_000),
                # gRPC's own reconnect backoff starts at 1 s: a retry of ours in that
                # window fails without trying to connect, so a daemon back after a
                # restart could outlast every attempt. Ours sets the pace instead.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
            ]
            if self._insecure:
                print(
                    f"WARNING: talking to {self.target} without TLS: the secret and every "
                    "prompt cross the network in clear text",
                    file=sys.stderr,
                )
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                creds = grpc.ssl_channel_credentials(root_certificates=self._ca_pem)
                self._channel = grpc.aio.secure_channel(self.target, creds, options=options)
            try:
                await self._ready(self._channel, time.monotonic() + self.connect_timeout)
            except TimeoutError:
                await self.aclose()
                raise ServerUnavailableError(
                    f"cannot reach vibectld at {self.target} within {self.connect_timeout:g} s; "
                    "is the server running and the address right? (vibectl setup-proxy status)"
                ) from None
            except VibectlError:
                await self.aclose()
                raise
            self._stub = pb_grpc.VibectlLLMProxyStub(self._channel)
        return self._stub

    async def _ready(self, channel: grpc.aio.Channel, deadline: float) -> None:
        """Wait until `channel` is connected; TimeoutError at `deadline`.

        Like channel_ready(), but each failed attempt is explained when it can be: a
        certificate gRPC refuses fails like a server that is down, and would otherwise
        be reported as one only once the whole connect timeout has passed.
        """
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                await self._raise_explained(deadline)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            await asyncio.wait_for(channel.wait_for_state_change(state), left)
            state = channel.get_state(try_to_connect=True)

    async def _raise_explained(self, deadline: float) -> None:
        """Raise the explanation of a failed connection, if there is one (off the loop:
        it opens a connection of its own)."""
        left = deadline - time.monotonic()
        if self._explain_failure is None or left <= 0:
            return
        explained = await asyncio.to_thread(self._explain_failure, left)
        if explained is not None:
            raise explained

    async def aclose(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel, self._stub = None, None

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry UNAVAILABLE with jittered backoff, and short limits after retry-after-ms.

        Nothing else is retried: after DEADLINE_EXCEEDED the server may have done the work.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                return await call()
            except grpc.aio.AioRpcError as e:
                code = e.code()
                error = error_from_rpc(e, self.target, self.timeout)
                delay = _retry_delay(code, error, attempt)
            if attempt == MAX_ATTEMPTS or delay is None:
                if code == grpc.StatusCode.UNAVAILABLE:
                    # A server back with another CA fails a connected channel this way.
                    await self._raise_explained(time.monotonic() + self.connect_timeout)
                raise error
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _request(model: str | None, prompt: Prompt) -> pb.ExecuteRequest:
        request = pb.ExecuteRequest(
            system_fragments=prompt.system_fragments,
            user_fragments=prompt.user_fragments,
            request_id=uuid.uuid4().hex,
        )
        if model:
            request.model_name = model
        if prompt.schema is not None:
            request.response_model_schema = json.dumps(prompt.schema)
        return request

    def get_model(self, name: str | None) -> str | None:
        """In proxy mode a model is just its name; the server resolves it (None: its default)."""
        return name

    async def _execute(self, model: Any, prompt: Prompt) -> tuple[str, LLMMetrics]:
        request = self._request(model, prompt)
        started = time.monotonic()

        async def call() -> pb.ExecuteResponse:
            stub = await self._connect()
            reply: pb.ExecuteResponse = await stub.Execute(
                request, metadata=self._metadata(), timeout=self.timeout
            )
            return reply

        reply = await self._with_retries(call)
        if reply.WhichOneof("result") == "error":
            raise _model_error(reply.error)
        success = reply.success
        return success.response_text, _metrics(success.metrics, success.actual_model_used, started)

    async def _stream(self, model: Any, prompt: Prompt) -> AsyncIterator[str]:
        request = self._request(model, prompt)

        async def first() -> tuple[Any, Any]:
            # Only the wait for the first chunk is retried: once text has been
            # shown, repeating the call would repeat it.
            stub = await self._connect()
            stream = stub.StreamExecute(request, metadata=self._metadata(), timeout=self.timeout)
            return stream, await stream.read()

        stream, chunk = await self._with_retries(first)
        try:
            while chunk is not grpc.aio.EOF:
                kind = chunk.WhichOneof("chunk_type")
                if kind == "text_chunk":
                    yield chunk.text_chunk
                elif kind == "error":
                    raise _model_error(chunk.error)
                chunk = await stream.read()
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, self.target, self.timeout) from None
        finally:
            stream.cancel()

    def validate_model_key(self, name: str | None) -> str | None:
        return None  # Keys live on the server.

    async def server_info(self) -> pb.GetServerInfoResponse:
        if self._info is None:

            async def call() -> pb.GetServerInfoResponse:
                stub = await self._connect()
                info: pb.GetServerInfoResponse = await stub.GetServerInfo(
                    pb.GetServerInfoRequest(), metadata=self._metadata(), timeout=self.timeout
                )
                return info

            self._info = await self._with_retries(call)
        return self._info

    async def validate_model_name(self, name: str) -> str | None:
        info = await self.server_info()
        known = {m.model_id for m in info.available_models} | set(info.model_aliases)
        if name in known:
            return None
        offered = ", ".join(sorted(m.model_id for m in info.available_models)) or "none"
        return f"model '{name}' is not offered to you by {self.target}; available: {offered}"

    async def list_models(self) -> list[dict[str, Any]]:
        info = await self.server_info()
        return [
            {
                "model_id": m.model_id,
                "provider": m.provider,
                "aliases": list(m.aliases),
                "default": m.model_id == info.default_model,
            }
            for m in info.available_models
        ]
