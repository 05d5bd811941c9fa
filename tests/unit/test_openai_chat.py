"""AiohttpAsyncChat against canned HTTP answers from a real local socket.

tests/integration/test_openai_compatible.py covers the model through the daemon
against the fake OpenAI endpoint; here each answer is exactly the bytes an odd
provider might send, to pin how every one of them is read.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from vibectld.providers.aiohttp_chat import (
    AiohttpAsyncChat,
    ProviderHTTPError,
    ProviderProtocolError,
    env_proxy,
)

# The bytes to send, or pieces sent apart (a short pause between them; a number in the
# list is a longer pause, in seconds).
Answer = Callable[[dict[str, Any]], bytes | Sequence[bytes | float]]


def http(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def sse(*events: str) -> bytes:
    return http("200 OK", "".join(f"data: {e}\n\n" for e in events).encode(), "text/event-stream")


def chunk(text: str | None = None, finish: str | None = None) -> str:
    delta = {} if text is None else {"content": text}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


class Canned:
    """An HTTP/1.1 server on 127.0.0.1 that answers every request with answer(request body)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")[1:]
                pairs = (line.partition(":") for line in lines if line)
                headers = {k.lower(): v.strip() for k, _, v in pairs}
                body = json.loads(await reader.readexactly(int(headers["content-length"])))
                self.requests.append((headers, body))
                answer = self.answer(body)
                for piece in [answer] if isinstance(answer, bytes) else answer:
                    if isinstance(piece, float):
                        await asyncio.sleep(piece)
                        continue
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.005)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.fixture
def model_for() -> Callable[[str], AiohttpAsyncChat]:
    def make(api_base: str) -> AiohttpAsyncChat:
        model = AiohttpAsyncChat("canned", model_name="m", api_base=api_base)
        model.needs_key = None  # type: ignore[assignment]  # llm types it str; None = keyless
        return model

    return make


async def ask(model: AiohttpAsyncChat, stream: bool) -> tuple[str, Any]:
    response = model.prompt("hi", stream=stream)
    try:
        return await response.text(), await response.usage()
    finally:
        await model.pool.aclose()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def completion(text: str | None) -> bytes:
    body = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    return http("200 OK", json.dumps(body).encode())


def test_a_completion_gives_its_text_and_usage_and_reuses_one_connection(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    canned = Canned(lambda body: completion("hello there"))

    async def go() -> None:
        async with canned as base:
            model = model_for(base)
            for _ in range(3):
                response = model.prompt("hi", system="be brief", stream=False)
                assert await response.text() == "hello there"
                usage = await response.usage()
                assert (usage.input, usage.output) == (3, 2)
            await model.pool.aclose()

    run(go())
    assert canned.connections == 1
    headers, body = canned.requests[0]
    assert body["model"] == "m" and body["stream"] is False
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert "authorization" not in headers  # no key configured, none sent


def test_a_stream_gives_each_delta_in_order_and_the_usage_chunk(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}})
    events = (chunk(""), chunk("a "), chunk("b "), chunk("c"), chunk(None, "stop"), usage, "[DONE]")
    canned = Canned(lambda body: sse(*events))

    async def go() -> tuple[str, Any]:
        async with canned as base:
            return await ask(model_for(base), True)

    text, got = run(go())
    assert text == "a b c"
    assert (got.input, got.output) == (4, 3)
    assert canned.requests[0][1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    ("answer", "error", "words"),
    [
        pytest.param(
            http("429 Too Many Requests", b'{"error": {"message": "slow down"}}'),
            ProviderHTTPError,
            "HTTP 429: slow down",
            id="json-error",
        ),
        pytest.param(
            http("502 Bad Gateway", b"<html>upstream gone</html>", "text/html"),
            ProviderHTTPError,
            "HTTP 502: <html>upstream gone</html>",
            id="html-error",
        ),
        pytest.param(
            http("200 OK", b"not json at all"), ProviderProtocolError, "not JSON", id="not-json"
        ),
        pytest.param(
            http("200 OK", b'{"choices": []}'),
            ProviderProtocolError,
            "not a chat completion",
            id="no-choices",
        ),
        pytest.param(
            http("200 OK", b'{"choices": [{"message": {"content": 7}}]}'),
            ProviderProtocolError,
            "non-text content",
            id="content-not-text",
        ),
    ],
)
def test_odd_completions_are_errors_that_say_what_was_wrong(
    model_for: Callable[[str], AiohttpAsyncChat], answer: bytes, error: type, words: str
) -> None:
    async def go() -> None:
        async with Canned(lambda body: answer) as base:
            await ask(model_for(base), False)

    with pytest.raises(error, match=words) as raised:
        run(go())
    if isinstance(raised.value, ProviderHTTPError):
        assert raised.value.status_code in (429, 502)


@pytest.mark.parametrize(
    ("events", "words"),
    [
        pytest.param((chunk("a"), "{broken"), "not JSON", id="event-not-json"),
        pytest.param((chunk("a"), "[1, 2]"), "not a JSON object", id="event-not-object"),
        pytest.param(
            ('{"choices": [{"delta": {"content": [1]}}]}',), "non-text content", id="delta-not-text"
        ),
        pytest.param(
            (chunk("a"), '{"error": {"message": "overloaded"}}'),
            "failed mid-stream: .*overloaded",
            id="error-event",
        ),
        # The body ends cleanly, but the reply was never finished: not a success.
        pytest.param((chunk("a"), chunk("b")), "ended before the reply was complete", id="no-end"),
    ],
)
def test_odd_streams_are_errors_that_say_what_was_wrong(
    model_for: Callable[[str], AiohttpAsyncChat], events: tuple[str, ...], words: str
) -> None:
    async def go() -> None:
        async with Canned(lambda body: sse(*events)) as base:
            await ask(model_for(base), True)

    with pytest.raises(ProviderProtocolError, match=words):
        run(go())


def test_events_split_anywhere_across_reads_are_put_back_together(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    whole = sse(chunk("alpha "), chunk("beta"), chunk(None, "stop"), "[DONE]")
    head_end = whole.index(b"\r\n\r\n") + 4
    body = whole[head_end:]
    # The head, then the body in 7-byte pieces: splits inside "data:", JSON and newlines.
    pieces = [whole[:head_end]] + [body[i : i + 7] for i in range(0, len(body), 7)]

    async def go() -> tuple[str, Any]:
        async with Canned(lambda body: pieces) as base:
            return await ask(model_for(base), True)

    assert run(go())[0] == "alpha beta"


def _streamed(*pieces: bytes | float) -> list[bytes | float]:
    """An SSE reply's head, then `pieces` of its body as given (a float is a pause)."""
    return [b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n", *pieces]


def body(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


async def lean(model: AiohttpAsyncChat) -> tuple[list[tuple[float, str]], Any]:
    """What the daemon's streaming path reads: (seconds from the start, text) per item."""
    response = model.prompt("hi", stream=True)
    started = loop_time()
    items = [(loop_time() - started, text) async for text in model.stream_text(response)]
    await model.pool.aclose()
    return items, response


def loop_time() -> float:
    return asyncio.get_running_loop().time()


def test_the_lean_path_gives_events_that_arrive_together_as_one_item(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 5}})
    pieces = _streamed(
        body(chunk(""), chunk("a ")),
        0.05,
        body(chunk("b "), chunk("c "), chunk("d ")),
        0.05,
        body(chunk("e"), chunk(None, "stop"), usage, "[DONE]"),
    )

    async def go() -> tuple[list[tuple[float, str]], Any]:
        async with Canned(lambda body: pieces) as base:
            return await lean(model_for(base))

    items, response = run(go())
    # Three reads, three items; the text and the usage exactly as llm's path gives them.
    assert [text for _, text in items] == ["a ", "b c d ", "e"]
    assert (response.input_tokens, response.output_tokens) == (4, 5)


def test_the_lean_path_gives_the_first_text_at_once(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    pieces = _streamed(body(chunk(""), chunk("first ")), 0.4, body(chunk("next", "stop"), "[DONE]"))

    async def go() -> list[tuple[float, str]]:
        async with Canned(lambda body: pieces) as base:
            return (await lean(model_for(base)))[0]

    (t_first, first), (t_next, _) = run(go())
    assert first == "first "
    assert t_next - t_first >= 0.3  # it did not wait for what came next


def test_the_lean_path_gives_the_text_before_a_bad_event_then_fails(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    pieces = _streamed(body(chunk("a "), chunk("b "), "{broken"))
    got: list[str] = []

    async def go() -> None:
        async with Canned(lambda body: pieces) as base:
            model = model_for(base)
            try:
                async for text in model.stream_text(model.prompt("hi", stream=True)):
                    got.append(text)
            finally:
                await model.pool.aclose()

    with pytest.raises(ProviderProtocolError, match="not JSON"):
        run(go())
    assert got == ["a b "]


def test_an_endless_line_is_refused_not_buffered_forever(
    model_for: Callable[[str], AiohttpAsyncChat], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("vibectld.providers.aiohttp_chat.MAX_EVENT_BYTES", 1000)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: 5000\r\n\r\n"
    pieces = [head] + [b"data: " + b"x" * 494] * 10

    async def go() -> None:
        async with Canned(lambda body: pieces) as base:
            await ask(model_for(base), True)

    with pytest.raises(ProviderProtocolError, match="a line over"):
        run(go())


def test_a_stream_finished_without_done_is_complete(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    async def go() -> tuple[str, Any]:
        async with Canned(lambda body: sse(chunk("a"), chunk(None, "stop"))) as base:
            return await ask(model_for(base), True)

    assert run(go())[0] == "a"


def test_a_key_is_sent_as_a_bearer_token(model_for: Callable[[str], AiohttpAsyncChat]) -> None:
    canned = Canned(lambda body: completion("ok"))

    async def go() -> None:
        async with canned as base:
            model = model_for(base)
            model.needs_key = "gpu-box"
            model.key = "sk-canned-0001"
            await ask(model, False)

    run(go())
    assert canned.requests[0][0]["authorization"] == "Bearer sk-canned-0001"


@pytest.mark.parametrize(
    ("environ", "url", "proxy"),
    [
        ({"HTTPS_PROXY": "http://egress:3128"}, "https://api.example.com/v1", "http://egress:3128"),
        ({"HTTP_PROXY": "http://egress:3128"}, "https://api.example.com/v1", None),
        (
            {"HTTPS_PROXY": "http://egress:3128", "NO_PROXY": "example.com"},
            "https://api.example.com/v1",
            None,
        ),
        ({}, "https://api.example.com/v1", None),
    ],
)
def test_proxy_variables_are_honoured_once_per_model(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], url: str, proxy: str | None
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert env_proxy(url) == proxy
