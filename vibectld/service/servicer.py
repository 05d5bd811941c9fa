"""The VibectlLLMProxy servicer: Execute, StreamExecute and GetServerInfo.

Order of checks on every call: authenticate → validate → resolve and authorize
the model → limits → run. Call failures are gRPC statuses (refusals.py);
model failures are in-band ExecuteErrors (providers/execution.py).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import structlog

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.generation import Generation
from vibectld.providers.catalogue import CatalogueEntry, UnknownModel
from vibectld.providers.execution import ErrorCode, ModelFailure, Outcome
from vibectld.runtime import Runtime
from vibectld.service.limits import EffectiveLimits, check_token_budget
from vibectld.service.refusals import (
    CallRefused,
    InvalidRequest,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
    abort,
)
from vibectld.store.registry import ClientRecord
from vibectld.version import __version__

log = structlog.get_logger("vibectld.proxy")


def _metrics(outcome: Outcome) -> pb.ExecutionMetrics:
    metrics = pb.ExecutionMetrics(
        duration_ms=outcome.duration_ms, retry_count=0, timestamp=int(time.time())
    )
    if outcome.input_tokens is not None:
        metrics.input_tokens = outcome.input_tokens
    if outcome.output_tokens is not None:
        metrics.output_tokens = outcome.output_tokens
    if outcome.input_tokens is not None or outcome.output_tokens is not None:
        metrics.total_tokens = (outcome.input_tokens or 0) + (outcome.output_tokens or 0)
    if outcome.cost_usd is not None:
        metrics.cost_usd = outcome.cost_usd
    return metrics


def _error(failure: ModelFailure) -> pb.ExecuteError:
    err = pb.ExecuteError(error_code=failure.code, error_message=failure.message)
    if failure.details:
        err.error_details = failure.details
    return err


class _Call:
    """What one authorized call needs to run, under the one generation it started with."""

    def __init__(
        self,
        gen: Generation,
        client: ClientRecord,
        entry: CatalogueEntry | None,
        failure: ModelFailure | None,
        schema: dict[str, Any] | None,
        timeout: float,
    ) -> None:
        self.gen = gen
        self.client = client
        self.entry = entry
        self.failure = failure
        self.schema = schema
        self.timeout = timeout
        self.started = time.monotonic()


class ProxyService(pb_grpc.VibectlLLMProxyServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime

    def _prepare(self, request: pb.ExecuteRequest, context: Any) -> _Call:
        rt = self.rt
        rt.last_arrival = time.monotonic()
        if rt.draining:
            raise Unavailable("vibectld is shutting down; retry in a moment")
        gen = rt.generation
        client = gen.auth.authenticate(context.invocation_metadata())
        config = gen.config
        size = request.ByteSize()
        if size > config.server.max_request_bytes:
            raise InvalidRequest(
                f"request is {size} bytes; this server accepts at most "
                f"{config.server.max_request_bytes} — send a shorter prompt"
            )
        if not any(f.strip() for f in request.user_fragments):
            raise InvalidRequest("request has no prompt: user_fragments is empty")
        max_chars = config.limits.max_input_chars
        if max_chars is not None:
            chars = sum(map(len, request.user_fragments)) + sum(map(len, request.system_fragments))
            if chars > max_chars:
                raise InvalidRequest(
                    f"input is {chars} characters; this server accepts at most {max_chars} "
                    "— send a shorter prompt"
                )
        schema: dict[str, Any] | None = None
        if request.HasField("response_model_schema"):
            try:
                parsed = json.loads(request.response_model_schema)
            except json.JSONDecodeError as e:
                raise InvalidRequest(f"response_model_schema is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise InvalidRequest("response_model_schema must be a JSON object (a JSON schema)")
            schema = parsed
        name = request.model_name if request.HasField("model_name") else None
        try:
            entry: CatalogueEntry | None = gen.catalogue.resolve(name)
        except UnknownModel as e:
            failure = ModelFailure(ErrorCode.MODEL_NOT_FOUND, str(e))
            return _Call(gen, client, None, failure, schema, 0)
        assert entry is not None
        if client.models is not None and entry.model_id not in client.models:
            raise PermissionDenied(
                f"client '{client.name}' may not use model '{entry.model_id}'; "
                f"allowed: {', '.join(client.models) or 'none'} — ask your vibectld admin"
            )
        return _Call(gen, client, entry, None, schema, float(config.limits.request_timeout_seconds))

    @contextmanager
    def _admitted(self, call: _Call) -> Iterator[None]:
        rt = self.rt
        limits = EffectiveLimits.of(call.client, call.gen.config.limits)
        now = time.time()
        # Checked before anything is reserved, so a refusal consumes no budget.
        check_token_budget(
            rt.registry.tokens_used(call.client.id, int(now)), limits.tokens_per_day, now
        )
        with (
            rt.limiter.admit(call.client.id, limits.rpm, limits.concurrency),
            rt.inflight.track(call.client.id),
        ):
            rt.metrics.in_flight.inc()
            try:
                yield
            finally:
                rt.metrics.in_flight.dec()

    def _revoked_now(self) -> bool:
        """True when this task was cancelled because its client was just revoked."""
        task = asyncio.current_task()
        if task is not None and self.rt.inflight.was_revoked(task):
            task.uncancel()
            return True
        return False

    def _done(
        self, call: _Call, request_id: str, status: str, outcome: Outcome | None = None
    ) -> None:
        """Price the call now (the reply carries it); count and log it just after."""
        seconds = time.monotonic() - call.started
        if outcome is not None:
            outcome.cost_usd = call.gen.cost_usd(
                outcome.model_id, outcome.input_tokens, outcome.output_tokens
            )
        # Accounting never sits on the request's critical path: it runs on the
        # loop's next turn, after the reply has been handed to gRPC.
        asyncio.get_running_loop().call_soon(
            self._record, call, request_id, status, outcome, seconds
        )

    def _record(
        self,
        call: _Call,
        request_id: str,
        status: str,
        outcome: Outcome | None,
        seconds: float,
    ) -> None:
        rt = self.rt
        model = call.entry.model_id if call.entry else "-"
        tokens_in = outcome.input_tokens if outcome else None
        tokens_out = outcome.output_tokens if outcome else None
        rt.registry.record_call(
            call.client.id,
            now=int(time.time()),
            error=status != "ok",
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=outcome.cost_usd if outcome else None,
        )
        rt.metrics.observe_call(call.client.name, model, status, seconds, tokens_in, tokens_out)
        log.info(
            "request",
            client=call.client.name,
            request_id=request_id,
            model=call.entry.model_id if call.entry else None,
            status=status,
            duration_ms=int(seconds * 1000),
            input_tokens=tokens_in,
            output_tokens=tokens_out,
        )

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        request_id = request.request_id or uuid.uuid4().hex
        try:
            call = self._prepare(request, context)
            if call.failure is not None:
                self._done(call, request_id, call.failure.code)
                return pb.ExecuteResponse(request_id=request_id, error=_error(call.failure))
            assert call.entry is not None
            with self._admitted(call):
                try:
                    async with asyncio.timeout(call.timeout):
                        outcome = await self.rt.executor.run(
                            call.entry,
                            list(request.system_fragments),
                            list(request.user_fragments),
                            call.schema,
                        )
                except ModelFailure as failure:
                    self._done(call, request_id, failure.code)
                    return pb.ExecuteResponse(request_id=request_id, error=_error(failure))
                except TimeoutError:
                    late = _timed_out(call)
                    self._done(call, request_id, late.code)
                    return pb.ExecuteResponse(request_id=request_id, error=_error(late))
                except asyncio.CancelledError:
                    if self._revoked_now():
                        raise Unauthenticated(_REVOKED_MID_CALL) from None
                    raise
            self._done(call, request_id, "ok", outcome)
            success = pb.ExecuteSuccess(
                response_text=outcome.text,
                metrics=_metrics(outcome),
                actual_model_used=outcome.model_id,
            )
            return pb.ExecuteResponse(request_id=request_id, success=success)
        except CallRefused as refusal:
            await self._refuse(context, refusal)

    async def _refuse(self, context: Any, refusal: CallRefused) -> NoReturn:
        reason = getattr(refusal, "limit_type", None) or refusal.code.name.lower()
        self.rt.metrics.refusals.labels(reason).inc()
        await abort(context, refusal)

    async def StreamExecute(self, request: pb.ExecuteRequest, context: Any) -> None:
        # Written with context.write, not as a generator: a cancellation (revocation,
        # deadline) then lands in this coroutine even while gRPC is busy writing.
        request_id = request.request_id or uuid.uuid4().hex
        try:
            call = self._prepare(request, context)
            if call.failure is not None:
                self._done(call, request_id, call.failure.code)
                await context.write(
                    pb.StreamChunk(request_id=request_id, error=_error(call.failure))
                )
                return
            assert call.entry is not None
            with self._admitted(call):
                outcome = Outcome(call.entry.model_id)
                try:
                    async with asyncio.timeout(call.timeout):
                        chunks = self.rt.executor.stream(
                            call.entry,
                            list(request.system_fragments),
                            list(request.user_fragments),
                            call.schema,
                            outcome,
                        )
                        try:
                            async for text in chunks:
                                await context.write(
                                    pb.StreamChunk(request_id=request_id, text_chunk=text)
                                )
                        finally:
                            await chunks.aclose()
                except ModelFailure as failure:
                    self._done(call, request_id, failure.code, outcome)
                    await context.write(
                        pb.StreamChunk(request_id=request_id, error=_error(failure))
                    )
                    return
                except TimeoutError:
                    late = _timed_out(call)
                    self._done(call, request_id, late.code, outcome)
                    await context.write(pb.StreamChunk(request_id=request_id, error=_error(late)))
                    return
                except asyncio.CancelledError:
                    if self._revoked_now():
                        raise Unauthenticated(_REVOKED_MID_CALL) from None
                    raise
            self._done(call, request_id, "ok", outcome)
            complete = pb.StreamComplete(actual_model_used=outcome.model_id)
            await context.write(pb.StreamChunk(request_id=request_id, complete=complete))
            await context.write(
                pb.StreamChunk(request_id=request_id, final_metrics=_metrics(outcome))
            )
        except CallRefused as refusal:
            await self._refuse(context, refusal)

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Any
    ) -> pb.GetServerInfoResponse:
        gen = self.rt.generation
        try:
            client = gen.auth.authenticate(context.invocation_metadata())
        except CallRefused as refusal:
            await self._refuse(context, refusal)
        catalogue = gen.catalogue
        allowed = set(client.models) if client.models is not None else None
        models = [
            pb.ModelInfo(
                model_id=e.model_id,
                display_name=e.model_id,
                provider=e.provider,
                supports_streaming=e.supports_streaming,
                aliases=sorted(a for a, t in catalogue.aliases().items() if t == e.model_id),
            )
            for e in catalogue.entries()
            if allowed is None or e.model_id in allowed
        ]
        offered = {m.model_id for m in models}
        default = catalogue.default
        if catalogue.has(default) and catalogue.resolve(default).model_id not in offered:
            default = min(offered) if offered else ""
        return pb.GetServerInfoResponse(
            available_models=models,
            default_model=default,
            limits=_server_limits(EffectiveLimits.of(client, gen.config.limits)),
            server_version=__version__,
            model_aliases={a: t for a, t in catalogue.aliases().items() if t in offered},
            server_name=gen.config.server.name,
        )


def _server_limits(limits: EffectiveLimits) -> pb.ServerLimits:
    reply = pb.ServerLimits(request_timeout_seconds=limits.request_timeout_seconds)
    if limits.rpm is not None:
        reply.max_requests_per_minute = limits.rpm
    if limits.concurrency is not None:
        reply.max_concurrent_requests = limits.concurrency
    if limits.max_input_chars is not None:
        reply.max_input_length = limits.max_input_chars
    return reply


_REVOKED_MID_CALL = "secret was revoked during this call — ask your vibectld admin for a new one"


def _timed_out(call: _Call) -> ModelFailure:
    model = call.entry.model_id if call.entry else "the model"
    return ModelFailure(
        ErrorCode.PROVIDER_TIMEOUT,
        f"'{model}' did not finish within the server's {call.timeout:g} s request timeout",
    )
