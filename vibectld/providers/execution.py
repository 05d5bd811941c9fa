"""Running one prompt through an llm model: async natively, sync in a bounded pool.

Cancellation reaches the provider: an async model's generator is closed, and
a sync model's worker stops pulling chunks at the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from vibectl import model_errors
from vibectl.model_errors import SERVER_KEY
from vibectl.model_errors import ErrorCode as ErrorCode  # re-exported: the service uses it
from vibectld.providers.aiohttp_chat import AiohttpAsyncChat
from vibectld.providers.catalogue import CatalogueEntry

# Chunks already waiting are sent as one message up to about this size, far below
# gRPC's message limit: a model that queued megabytes still streams in pieces.
COALESCE_CHARS = 64 * 1024


class ModelFailure(Exception):
    """The model could not answer; reported to the client in-band.

    `message` and `details` go to the client; `logged` (what the provider
    really said, which can name internal hosts or quote an upstream body) goes
    only to the daemon's log, with the call's client and request_id.
    """

    def __init__(
        self, code: str, message: str, details: str | None = None, logged: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details
        self.logged = logged


@dataclass
class Outcome:
    model_id: str
    text: str = ""
    input_tokens: int | None = None
    output_tokens: int | None = None
    duration_ms: int = 0
    cost_usd: float | None = None


def classify(exc: BaseException, model_id: str, redact: Callable[[str], str]) -> ModelFailure:
    """Map whatever a provider or plugin raised to one in-band failure.

    The code comes from vibectl.model_errors, shared with the client's direct
    mode, so one provider failure has the same code through the proxy and
    without it. What the provider said is for the operator, not the client: an
    exception's text can name the server's internal endpoints ("Cannot connect
    to host 10.0.0.7:8000") or quote an upstream body, so the client gets the
    code, a message without it and, as details, the exception's type and HTTP
    status; the full (key-redacted) text is logged.
    """
    if isinstance(exc, ModelFailure):
        return exc
    failure = model_errors.classify(exc, model_id, SERVER_KEY, redact)
    message = failure.message
    if failure.code == ErrorCode.PROVIDER_ERROR:
        # model_errors quotes the exception here, which direct mode wants and we do not.
        message = (
            f"the provider of '{model_id}' failed; the vibectld admin can find what it said "
            "in the server's log under this request_id"
        )
    status = getattr(exc, "status_code", None)
    details = type(exc).__name__ + (f" (HTTP {status})" if isinstance(status, int) else "")
    return ModelFailure(failure.code, message, details, logged=failure.details)


class Executor:
    """Runs prompts; owns the thread pool for models that only have a sync API."""

    def __init__(self, sync_workers: int) -> None:
        self._pool = ThreadPoolExecutor(sync_workers, thread_name_prefix="vibectld-model")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def run(
        self,
        entry: CatalogueEntry,
        system_fragments: list[str],
        user_fragments: list[str],
        schema: dict[str, Any] | None,
    ) -> Outcome:
        """The whole reply at once."""
        outcome = Outcome(entry.model_id)
        if entry.async_model is None:
            chunks = [
                chunk
                async for chunk in self.stream(
                    entry, system_fragments, user_fragments, schema, outcome
                )
            ]
            outcome.text = "".join(chunks)
            return outcome
        # The async path without generator layers: this is the hot path of Execute.
        self._check_schema(entry, schema)
        started = time.monotonic()
        try:
            response = entry.async_model.prompt(
                None,
                fragments=user_fragments,
                system_fragments=system_fragments,
                schema=schema,
                stream=False,
            )
            outcome.text = await response.text()
            usage = await response.usage()
        except ModelFailure:
            raise
        except Exception as e:
            raise classify(e, entry.model_id, entry.redact) from e
        finally:
            outcome.duration_ms = int((time.monotonic() - started) * 1000)
        outcome.input_tokens, outcome.output_tokens = usage.input, usage.output
        return outcome

    @staticmethod
    def _check_schema(entry: CatalogueEntry, schema: dict[str, Any] | None) -> None:
        if schema is not None and not entry.supports_schema:
            raise ModelFailure(
                ErrorCode.SCHEMA_NOT_SUPPORTED,
                f"model '{entry.model_id}' cannot follow a response schema; "
                "choose a model that supports schemas or send the request without one",
            )

    async def stream(
        self,
        entry: CatalogueEntry,
        system_fragments: list[str],
        user_fragments: list[str],
        schema: dict[str, Any] | None,
        outcome: Outcome,
    ) -> AsyncGenerator[str, None]:
        """Yield text as it arrives; fill `outcome` with usage when the reply is complete.

        Where the model can tell, text that was already waiting comes as one item
        (the OpenAI-compatible endpoints: all that one read from the connection
        brought; sync models: all their pool thread had queued), so the caller sends
        one message for it; the first text is never held back.

        The caller owns the deadline: a timeout around the consumer cancels the
        provider call through this generator's close.
        """
        self._check_schema(entry, schema)
        kwargs: dict[str, Any] = {
            "fragments": list(user_fragments),
            "system_fragments": list(system_fragments),
            "schema": schema,
            "stream": entry.supports_streaming,
        }
        started = time.monotonic()
        model = entry.async_model
        lean = None
        try:
            if isinstance(model, AiohttpAsyncChat) and entry.supports_streaming:
                # The lean path: llm builds the prompt, the model streams text to us directly.
                lean = model.prompt(None, **kwargs)
                source = model.stream_text(lean)
            elif model is not None:
                source = self._stream_async(entry, kwargs, outcome)
            else:
                source = self._stream_sync(entry, kwargs, outcome)
        except Exception as e:
            outcome.duration_ms = int((time.monotonic() - started) * 1000)
            raise classify(e, entry.model_id, entry.redact) from e
        try:
            async for chunk in source:
                yield chunk
            if lean is not None:
                outcome.input_tokens, outcome.output_tokens = lean.input_tokens, lean.output_tokens
        except ModelFailure:
            raise
        except Exception as e:
            raise classify(e, entry.model_id, entry.redact) from e
        finally:
            await source.aclose()
            outcome.duration_ms = int((time.monotonic() - started) * 1000)

    async def _stream_async(
        self, entry: CatalogueEntry, kwargs: dict[str, Any], outcome: Outcome
    ) -> AsyncGenerator[str, None]:
        response = entry.async_model.prompt(None, **kwargs)
        # astream_events closes the model's own generator (and with it the provider's
        # HTTP stream) when it is closed early, which iterating the response does not.
        events = response.astream_events()
        try:
            async for event in events:
                if event.type == "text" and event.chunk:
                    yield event.chunk
        finally:
            await events.aclose()
        usage = await response.usage()
        outcome.input_tokens, outcome.output_tokens = usage.input, usage.output

    async def _stream_sync(
        self, entry: CatalogueEntry, kwargs: dict[str, Any], outcome: Outcome
    ) -> AsyncGenerator[str, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()

        def post(kind: str, value: Any) -> None:
            # The loop may be gone if the daemon stopped while the provider was talking.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            try:
                response = entry.sync_model.prompt(None, **kwargs)
                for chunk in response:
                    if stop.is_set():
                        return
                    post("chunk", chunk)
                post("done", response.usage())
            except BaseException as e:
                post("error", e)

        future = loop.run_in_executor(self._pool, work)
        held: tuple[str, Any] | None = None
        try:
            while True:
                kind, value = held if held is not None else await queue.get()
                held = None
                if kind == "chunk":
                    # Chunks that are already waiting go out as one.
                    texts, size = [value], len(value)
                    while size < COALESCE_CHARS and not queue.empty():
                        item = queue.get_nowait()
                        if item[0] != "chunk":
                            held = item
                            break
                        texts.append(item[1])
                        size += len(item[1])
                    yield texts[0] if len(texts) == 1 else "".join(texts)
                elif kind == "done":
                    outcome.input_tokens, outcome.output_tokens = value.input, value.output
                    return
                else:
                    raise value
        finally:
            stop.set()
            if future.done():
                future.result()
