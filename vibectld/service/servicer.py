"""The VibectlLLMProxy servicer: Execute, StreamExecute and GetServerInfo.

Order of checks on every call (the contract's): authenticate → request_id
shape → the client's rate limit → validate the request → redaction policy →
authorize the model → budgets (tokens, then dollars: budgets.py) → concurrency →
run. Authentication happens first at the door (gate.py, before the
message is read) and again here, under the generation the call runs with. Call
failures are gRPC statuses (refusals.py); model failures are in-band
ExecuteErrors (providers/execution.py).

On one node the rpm and concurrency steps are decided in memory with no await
between check and reservation (limits.py). When the store is shared, both are
decided by the database in one awaited round trip (cluster_limits.py), made only
for a client with either limit set: the checks in memory run first and their
verdict is held, then the round trip counts the call (and takes its slot only if
nothing refused it), and the refusals are raised in the contract's order, so a
client sees the refusal it would see on one node and a refused call takes
nothing. The single-node path has no await added. A worker process
(`server.workers` > 1) takes the same shared path, with its main process as the
judge (workers/view.py), which also checks the budgets for the model passed.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, NoReturn

import structlog

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.generation import Generation
from vibectld.providers.catalogue import CatalogueEntry
from vibectld.providers.execution import ErrorCode, ModelFailure, Outcome
from vibectld.runtime import Runtime
from vibectld.service.budgets import check_dollar_budgets, usd_left
from vibectld.service.gate import FailedAuthLog
from vibectld.service.limits import EffectiveLimits, check_token_budget
from vibectld.service.redaction import Screened, SecretsRefused, kinds_text
from vibectld.service.refusals import CallRefused, Unauthenticated, Unavailable, abort
from vibectld.service.requests import authorize, request_id_of, validate
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
        limits: EffectiveLimits,
        request_id: str,
        entry: CatalogueEntry | None,
        failure: ModelFailure | None,
        schema: dict[str, Any] | None,
        screened: Screened,
    ) -> None:
        self.gen = gen
        self.client = client
        self.limits = limits
        self.request_id = request_id
        self.entry = entry
        self.failure = failure
        self.schema = schema
        # The fragments as the model may see them (redacted), and what was found.
        self.screened = screened
        self.timeout = float(limits.request_timeout_seconds)
        self.started = time.monotonic()


class _Admission:
    """For the block: the call's concurrency slot (this node's, or the lease the shared
    judge granted), its place among its client's calls in flight, and the gauge.

    A class rather than nested generator context managers: those cost a generator and
    its frames, three times, on every call's path.
    """

    __slots__ = ("_client_id", "_concurrency", "_lease", "_rt", "_task")

    def __init__(self, rt: Runtime, call: _Call, lease: Any) -> None:
        self._rt = rt
        self._client_id = call.client.id
        self._concurrency = call.limits.concurrency
        self._lease = lease
        self._task: asyncio.Task[object] | None = None

    def __enter__(self) -> None:
        rt = self._rt
        if self._lease is None:
            rt.limiter.take(self._client_id, self._concurrency)  # or LimitExceeded
        self._task = rt.inflight.enter(self._client_id)
        rt.metrics.in_flight.inc()

    def __exit__(self, *_: object) -> None:
        rt = self._rt
        rt.metrics.in_flight.dec()
        assert self._task is not None
        rt.inflight.leave(self._client_id, self._task)
        if self._lease is None:
            rt.limiter.give_back(self._client_id)
        else:
            assert rt.cluster is not None
            rt.cluster.release(self._lease)


class ProxyService(pb_grpc.VibectlLLMProxyServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime, failed_auth: FailedAuthLog | None = None) -> None:
        self.rt = runtime
        self.failed_auth = failed_auth or FailedAuthLog()

    def _prepare(self, request: pb.ExecuteRequest, context: Any) -> _Call:
        """Every check before the model, in the contract's order; raises CallRefused.

        The callers enter `_admitted` with nothing suspending after this, so no other
        call can slip between these checks and the concurrency reservation.
        """
        gen, client, request_id, limits = self._arrive(request, context)
        # Every authenticated call counts, whatever the checks below make of it.
        self.rt.limiter.count_request(client.id, limits.rpm)
        try:
            return self._checked(request, gen, client, request_id, limits)
        except SecretsRefused as refusal:
            self._secrets_refused(client, request_id, refusal)
            raise

    async def _prepare_shared(self, request: pb.ExecuteRequest, context: Any) -> tuple[_Call, Any]:
        """`_prepare` and the budgets with a shared store; the call's slot if it runs."""
        gen, client, request_id, limits = self._arrive(request, context)
        cluster = self.rt.cluster
        assert cluster is not None
        call: _Call | None = None
        held: CallRefused | None = None
        try:
            call = self._checked(request, gen, client, request_id, limits)
            if call.failure is None:
                self._check_budgets(call)
        except CallRefused as refusal:
            held = refusal  # raised once the call is counted, as the order says
        runs = call is not None and call.failure is None
        # The model, for a worker's admission: the main process checks its budgets.
        model_id = call.entry.model_id if runs and call is not None and call.entry else None
        lease = await cluster.admit(
            client.id, limits.rpm, limits.concurrency, slot=runs, model_id=model_id
        )
        if held is not None:
            if isinstance(held, SecretsRefused):
                self._secrets_refused(client, request_id, held)
            raise held
        assert call is not None
        if lease is not None:
            # A revocation during the round trip found no call of this client to
            # cancel: look again before the call is tracked.
            current = self.rt.registry.get(client.id)
            if current is None or current.status(int(time.time())) != "active":
                cluster.release(lease)
                raise Unauthenticated(_REVOKED_MID_CALL)
        return call, lease

    async def _begin(self, request: pb.ExecuteRequest, context: Any) -> tuple[_Call, Any]:
        """The call checked, with its lease when another judge admits it; a call that
        will not reach the model (`failure`) is already counted as done."""
        # One node: nothing here suspends (the checks are in memory), so no other call
        # runs between them and `_admitted`.
        if self.rt.cluster is None:
            call, lease = self._prepare(request, context), None
        else:
            call, lease = await self._prepare_shared(request, context)
        if call.failure is not None:
            self._done(call, call.failure.code, failure=call.failure)
        return call, lease

    def _secrets_refused(
        self, client: ClientRecord, request_id: str, refusal: SecretsRefused
    ) -> None:
        asyncio.get_running_loop().call_soon(
            self._record_refused, client, request_id, refusal.found
        )

    def _arrive(
        self, request: pb.ExecuteRequest, context: Any
    ) -> tuple[Generation, ClientRecord, str, EffectiveLimits]:
        rt = self.rt
        rt.last_arrival = time.monotonic()
        if rt.draining:
            raise Unavailable("vibectld is shutting down; retry in a moment")
        gen = rt.generation
        client = self._authenticate(gen, context)
        request_id = request_id_of(request.request_id)
        return gen, client, request_id, EffectiveLimits.of(client, gen.config.limits)

    def _checked(
        self,
        request: pb.ExecuteRequest,
        gen: Generation,
        client: ClientRecord,
        request_id: str,
        limits: EffectiveLimits,
    ) -> _Call:
        """The checks after the rpm step, up to the model's authorization."""
        schema = validate(request, gen.config.server.max_request_bytes, limits.max_input_chars)
        # Before the model is chosen and any budget is looked at: a refused prompt
        # costs nothing, and no model ever receives a secret that was found.
        screened = gen.redaction.screen(request.system_fragments, request.user_fragments)
        entry, failure = authorize(request, client, gen)
        return _Call(gen, client, limits, request_id, entry, failure, schema, screened)

    def _check_budgets(self, call: _Call) -> None:
        rt = self.rt
        now = time.time()
        # Checked before anything is reserved, so a refusal consumes no budget.
        check_token_budget(
            rt.registry.tokens_used(call.client.id, int(now)), call.limits.tokens_per_day, now
        )
        assert call.entry is not None
        check_dollar_budgets(rt.registry, call.gen, call.client, call.limits, call.entry, now)

    def _admitted(self, call: _Call, lease: Any = None) -> _Admission:
        """The budgets checked (one node), then `_Admission` holds the call's slot."""
        if lease is None:
            self._check_budgets(call)
        return _Admission(self.rt, call, lease)

    def _revoked_now(self) -> bool:
        """True when this task was cancelled because its client was just revoked."""
        task = asyncio.current_task()
        if task is not None and self.rt.inflight.was_revoked(task):
            task.uncancel()
            return True
        return False

    def _done(
        self,
        call: _Call,
        status: str,
        outcome: Outcome | None = None,
        failure: ModelFailure | None = None,
    ) -> None:
        """Price the call now (the reply carries it); count and log it just after."""
        seconds = time.monotonic() - call.started
        if outcome is not None:
            outcome.cost_usd = call.gen.cost_usd(
                outcome.model_id, outcome.input_tokens, outcome.output_tokens
            )
        # Accounting never sits on the request's critical path: it runs on the
        # loop's next turn, after the reply has been handed to gRPC.
        asyncio.get_running_loop().call_soon(self._record, call, status, outcome, failure, seconds)

    def _record(
        self,
        call: _Call,
        status: str,
        outcome: Outcome | None,
        failure: ModelFailure | None,
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
        fields: dict[str, Any] = {}
        found = call.screened.found
        if found:
            rt.registry.record_redactions(call.client.id, now=int(time.time()), found=found)
            rt.metrics.observe_redactions(found, "redacted")
            fields.update(redactions=found.total(), kinds=kinds_text(found))
        if failure is not None and failure.logged:
            # What the provider said: for the operator, never sent to the client.
            fields["provider_error"] = failure.logged
        log.info(
            "request",
            client=call.client.name,
            request_id=call.request_id,
            model=call.entry.model_id if call.entry else None,
            status=status,
            duration_ms=int(seconds * 1000),
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            **fields,
        )

    def _record_refused(self, client: ClientRecord, request_id: str, found: Counter[str]) -> None:
        """Count and log a call refused for the secrets in its prompt (never the prompt)."""
        self.rt.registry.record_redactions(client.id, now=int(time.time()), found=found)
        self.rt.metrics.observe_redactions(found, "refused")
        log.info(
            "request",
            client=client.name,
            request_id=request_id,
            status="secrets_refused",
            redactions=found.total(),
            kinds=kinds_text(found),
        )

    async def Execute(self, request: pb.ExecuteRequest, context: Any) -> pb.ExecuteResponse:
        try:
            call, lease = await self._begin(request, context)
            request_id = call.request_id
            if call.failure is not None:
                return pb.ExecuteResponse(request_id=request_id, error=_error(call.failure))
            assert call.entry is not None
            with self._admitted(call, lease):
                try:
                    async with asyncio.timeout(call.timeout):
                        outcome = await self.rt.executor.run(
                            call.entry, call.screened.system, call.screened.user, call.schema
                        )
                except ModelFailure as failure:
                    self._done(call, failure.code, failure=failure)
                    return pb.ExecuteResponse(request_id=request_id, error=_error(failure))
                except TimeoutError:
                    late = _timed_out(call)
                    self._done(call, late.code)
                    return pb.ExecuteResponse(request_id=request_id, error=_error(late))
                except asyncio.CancelledError:
                    if self._revoked_now():
                        raise Unauthenticated(_REVOKED_MID_CALL) from None
                    raise
            self._done(call, "ok", outcome)
            success = pb.ExecuteSuccess(
                response_text=outcome.text,
                metrics=_metrics(outcome),
                actual_model_used=outcome.model_id,
            )
            return pb.ExecuteResponse(request_id=request_id, success=success)
        except CallRefused as refusal:
            await self._refuse(context, refusal)

    async def _refuse(self, context: Any, refusal: CallRefused) -> NoReturn:
        self.rt.metrics.refusals.labels(refusal.reason).inc()
        await abort(context, refusal)

    def _authenticate(self, gen: Generation, context: Any) -> ClientRecord:
        try:
            return gen.auth.authenticate(context.invocation_metadata())
        except Unauthenticated as refusal:
            self.failed_auth.refused(context.peer(), refusal.message)
            raise

    async def StreamExecute(self, request: pb.ExecuteRequest, context: Any) -> None:
        # Written with context.write, not as a generator: a cancellation (revocation,
        # deadline) then lands in this coroutine even while gRPC is busy writing.
        try:
            call, lease = await self._begin(request, context)
            request_id = call.request_id
            if call.failure is not None:
                await context.write(
                    pb.StreamChunk(request_id=request_id, error=_error(call.failure))
                )
                return
            assert call.entry is not None
            with self._admitted(call, lease):
                outcome = Outcome(call.entry.model_id)
                try:
                    async with asyncio.timeout(call.timeout):
                        chunks = self.rt.executor.stream(
                            call.entry,
                            call.screened.system,
                            call.screened.user,
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
                    self._done(call, failure.code, outcome, failure)
                    await context.write(
                        pb.StreamChunk(request_id=request_id, error=_error(failure))
                    )
                    return
                except TimeoutError:
                    late = _timed_out(call)
                    self._done(call, late.code, outcome)
                    await context.write(pb.StreamChunk(request_id=request_id, error=_error(late)))
                    return
                except asyncio.CancelledError:
                    if self._revoked_now():
                        raise Unauthenticated(_REVOKED_MID_CALL) from None
                    raise
            self._done(call, "ok", outcome)
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
            client = self._authenticate(gen, context)
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
        limits = EffectiveLimits.of(client, gen.config.limits)
        spent = 0.0
        if limits.usd_per_month is not None:
            now = time.time()
            known = (
                await self.rt.cluster.usd_spent_month(client.id, now) if self.rt.cluster else None
            )
            spent = self.rt.registry.usd_spent_month(client.id, now) if known is None else known
        offered = {m.model_id for m in models}
        default = catalogue.default
        if catalogue.has(default) and catalogue.resolve(default).model_id not in offered:
            default = min(offered) if offered else ""
        return pb.GetServerInfoResponse(
            available_models=models,
            default_model=default,
            limits=_server_limits(limits, spent),
            server_version=__version__,
            model_aliases={a: t for a, t in catalogue.aliases().items() if t in offered},
            server_name=gen.config.server.name,
        )


def _server_limits(limits: EffectiveLimits, usd_spent_month: float) -> pb.ServerLimits:
    reply = pb.ServerLimits(request_timeout_seconds=limits.request_timeout_seconds)
    if limits.rpm is not None:
        reply.max_requests_per_minute = limits.rpm
    if limits.concurrency is not None:
        reply.max_concurrent_requests = limits.concurrency
    if limits.max_input_chars is not None:
        reply.max_input_length = limits.max_input_chars
    if limits.usd_per_month is not None:
        reply.usd_per_month = limits.usd_per_month
        reply.usd_left_this_month = usd_left(limits.usd_per_month, usd_spent_month)
    return reply


_REVOKED_MID_CALL = "secret was revoked during this call — ask your vibectld admin for a new one"


def _timed_out(call: _Call) -> ModelFailure:
    model = call.entry.model_id if call.entry else "the model"
    return ModelFailure(
        ErrorCode.PROVIDER_TIMEOUT,
        f"'{model}' did not finish within the server's {call.timeout:g} s request timeout",
    )
