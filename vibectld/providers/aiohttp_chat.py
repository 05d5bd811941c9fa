"""llm's async OpenAI chat model with its transport replaced by one pooled aiohttp session.

The messages and request options are still built by llm's own AsyncChat
(build_messages, build_kwargs), so a prompt means exactly what it means to llm.
Only the HTTP exchange is ours: the openai package spends about 1.7 ms of CPU per
call turning JSON into pydantic objects and httpx spends about 1.4 ms more; on a
two-core host that, not the provider, caps what a proxy can serve. aiohttp's C
parser does the same exchange in about 0.5 ms (bench/results has the numbers).

Everything the openai package did that a proxy must not do is absent: no
retries, no sleeping through retry-after, no new client per prompt. A caller
that stops early closes the HTTP response, and with it the provider's stream,
at once; nothing waits for the garbage collector.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
import urllib.request
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from llm.default_plugins.openai_models import AsyncChat

from vibectld.providers.pacing import PACING, rest

# openai's own defaults, so moving off that package changes no limit an operator relied on.
MAX_CONNECTIONS = 1000
CONNECT_TIMEOUT_S = 10.0
ERROR_BODY_LIMIT = 64 * 1024
# One event of a stream; a provider sending more without a newline is broken, not slow.
MAX_EVENT_BYTES = 16 * 2**20


class ProviderHTTPError(Exception):
    """The endpoint answered with an HTTP error; status_code drives the in-band error code."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code


class ProviderProtocolError(Exception):
    """The endpoint's answer was not an OpenAI chat completion."""


class SessionPool:
    """One aiohttp session (and so one connection pool) per event loop, made on first use."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            # A session is bound to the loop it was made in; one from a loop that has
            # ended cannot be closed from here and is left to be collected.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS, limit_per_host=0),
                # No read timeout: every call runs under the daemon's own deadline
                # (limits.request_timeout_seconds), and aiohttp re-arms a read timeout's
                # timer on every packet received, which is once per token of every stream.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
                # Not per request: aiohttp would re-read the proxy variables and ~/.netrc
                # in a worker thread on every call. env_proxy reads them once.
                trust_env=False,
                raise_for_status=False,
            )
            self._loop = loop
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed and self._loop is asyncio.get_running_loop():
            await session.close()


class AiohttpAsyncChat(AsyncChat):
    """AsyncChat for one OpenAI-compatible endpoint, over a shared session."""

    supports_tools = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        self.pool = SessionPool()
        self._url = f"{str(self.api_base).rstrip('/')}/chat/completions"
        self._proxy = env_proxy(self._url)

    def stream_text(self, response: Any) -> AsyncGenerator[str, None]:
        """The daemon's streaming path: the reply's text as it arrives, llm's per-chunk
        machinery (stream events, part indices, the chunk list) left out.

        `response` is what `prompt(..., stream=True)` returned: llm has built the
        prompt and validated its options, and the request is built from it exactly as
        for execute(). Usage is recorded on `response` (set_usage) as execute() does;
        nothing else of it is filled in, so read `response.input_tokens` and
        `response.output_tokens` afterwards, not `await response.usage()`, which
        would run the prompt again. Each item is the text of every event one read from
        the connection brought: one event when the provider is paced, several when
        more than one was waiting, and the first as soon as it arrives.
        """
        key = self.get_key(getattr(response, "_key", None))
        return self.execute(response.prompt, True, response, response.conversation, key)

    async def execute(
        self,
        prompt: Any,
        stream: bool,
        response: Any,
        conversation: Any = None,
        key: str | None = None,
    ) -> AsyncGenerator[str, None]:
        """llm's entry point (Execute, and llm's own API): llm wraps what this yields."""
        if prompt.system and not self.allows_system_prompt:
            raise NotImplementedError("Model does not support system prompts")
        body = {
            "model": self.model_name or self.model_id,
            "messages": self.build_messages(
                prompt, conversation, image_detail=getattr(prompt.options, "image_detail", None)
            ),
            "stream": stream,
            **self.build_kwargs(prompt, stream),  # type: ignore[no-untyped-call]
        }
        headers = {"Authorization": f"Bearer {key}"} if key else None
        async with self.pool.get().post(
            self._url, json=body, headers=headers, proxy=self._proxy
        ) as reply:
            try:
                if reply.status >= 400:
                    raise ProviderHTTPError(reply.status, await _error_text(reply))
                if not stream:
                    whole = _completion_text(await _json(reply), response)
                    if whole:
                        yield whole
                    return
                # The event stream, read here rather than through one more generator: this
                # loop runs once per read of every open stream. Each item is the text of
                # every event that read completed.
                events = _EventStream(response)
                connection = reply.connection
                transport = connection.transport if connection is not None else None
                with PACING.stream():
                    async for received in reply.content.iter_any():
                        if text := events.feed(received):
                            yield text
                            # After the message went out: a busy process reads less often.
                            if seconds := PACING.rest():
                                await rest(transport, seconds)
                        if events.failure is not None or events.done:
                            break
                    else:
                        if text := events.end():
                            yield text
                events.check()
            except BaseException:
                # Not back into the pool: the rest of this answer is still on the wire.
                reply.close()
                raise


def env_proxy(url: str) -> str | None:
    """The proxy that HTTPS_PROXY / HTTP_PROXY name for url, unless NO_PROXY exempts its host.

    Read when the model is built (at start and on reload), as the openai package
    honoured these variables and operators behind an egress proxy rely on them.
    """
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return proxies.get(parts.scheme)


async def _json(reply: aiohttp.ClientResponse) -> Any:
    raw = await reply.read()
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ProviderProtocolError(
            f"the endpoint's answer is not JSON ({e}): {raw[:200]!r}"
        ) from None


def _usage(data: Any, response: Any) -> None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict):
        response.set_usage(input=usage.get("prompt_tokens"), output=usage.get("completion_tokens"))


def _completion_text(data: Any, response: Any) -> str | None:
    try:
        message = data["choices"][0]["message"]
        text = message.get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ProviderProtocolError(
            f"the endpoint's answer is not a chat completion: {str(data)[:200]}"
        ) from None
    if text is not None and not isinstance(text, str):
        raise ProviderProtocolError("the endpoint's answer has non-text content")
    response.response_json = data
    _usage(data, response)
    return text


class _EventStream:
    """A chat.completion.chunk event stream, parsed as it is received.

    Lines are split on bytes (a newline never occurs inside a UTF-8 sequence), the
    complete ones decoded once per read, and only `data:` lines parsed as JSON.
    """

    __slots__ = ("done", "failure", "finished", "pieces", "response", "size")

    def __init__(self, response: Any) -> None:
        self.response = response
        # The unfinished line, kept in pieces so a long one is not copied once per piece.
        self.pieces: list[bytes] = []
        self.size = 0
        self.finished = False  # a choice carried finish_reason
        self.done = False  # [DONE] arrived: nothing after it is read
        self.failure: ProviderProtocolError | None = None

    def feed(self, received: bytes) -> str:
        """The text of every event completed by `received`, joined (may be empty).

        A malformed event stops the stream: the text of the events before it is
        returned, and `failure` says what was wrong.
        """
        lines, newline, rest = received.rpartition(b"\n")
        if not newline:
            self.pieces.append(received)
            self.size += len(received)
            if self.size > MAX_EVENT_BYTES:
                raise ProviderProtocolError(
                    f"the endpoint's stream has a line over {MAX_EVENT_BYTES // 2**20} MiB"
                )
            return ""
        if self.pieces:
            self.pieces.append(lines)
            lines = b"".join(self.pieces)
        self.pieces, self.size = ([rest], len(rest)) if rest else ([], 0)
        return self._lines(lines)

    def end(self) -> str:
        """The text of a last event not followed by a newline (the body ended)."""
        last = b"".join(self.pieces)
        self.pieces, self.size = [], 0
        return self._lines(last) if last else ""

    def check(self) -> None:
        """Raise what was wrong with the stream: a bad event, or an end before the reply's."""
        if self.failure is not None:
            raise self.failure
        if not self.finished and not self.done:
            raise ProviderProtocolError(
                "the endpoint's stream ended before the reply was complete; try again"
            )

    def _lines(self, block: bytes) -> str:
        try:
            lines = block.decode().split("\n")
        except UnicodeDecodeError:
            self.failure = ProviderProtocolError(
                f"the endpoint's stream is not UTF-8 text: {block[:200]!r}"
            )
            return ""
        texts: list[str] = []
        try:
            for line in lines:
                # Blank separators, comments and event names carry no data.
                if line.startswith("data:"):
                    self._event(line[5:].strip(), texts)
                    if self.done:
                        break
        except ProviderProtocolError as e:
            self.failure = e
        return texts[0] if len(texts) == 1 else "".join(texts)

    def _event(self, payload: str, texts: list[str]) -> None:
        if payload == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(payload)
        except ValueError:
            raise ProviderProtocolError(
                f"the endpoint's stream has an event that is not JSON: {payload[:200]!r}"
            ) from None
        if not isinstance(event, dict):
            raise ProviderProtocolError(
                "the endpoint's stream has an event that is not a JSON object"
            )
        if "error" in event:
            detail = str(event["error"])[:300]
            raise ProviderProtocolError(f"the endpoint failed mid-stream: {detail}")
        if "usage" in event:
            _usage(event, self.response)
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else None
            if text is not None:
                if not isinstance(text, str):
                    raise ProviderProtocolError("the endpoint's stream has non-text content")
                if text:
                    texts.append(text)
            if choice.get("finish_reason"):
                self.finished = True


async def _error_text(reply: aiohttp.ClientResponse) -> str:
    """The provider's own words for an error, from a JSON error object or the body's start."""
    raw = b""
    # read(n) returns what has arrived, up to n: loop until the limit or the body's end.
    while len(raw) < ERROR_BODY_LIMIT and (
        more := await reply.content.read(ERROR_BODY_LIMIT - len(raw))
    ):
        raw += more
    try:
        data = json.loads(raw)
        message = data["error"]["message"] if isinstance(data.get("error"), dict) else data["error"]
        return str(message)[:500]
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw[:500].decode("utf-8", "replace").strip() or (reply.reason or "no detail")
