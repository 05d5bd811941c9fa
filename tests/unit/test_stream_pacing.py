"""A busy serving process reads each provider stream less often (vibectld/providers/pacing.py).

Against a real local HTTP server (tests/unit/test_openai_chat.py's Canned), streaming one
event every 10 ms: with few streams open each event is its own item; with the process
past FREE_STREAMS open streams (the other streams are held open through the same
`PACING.stream()` the model uses) the events that arrive during a rest come as one item,
the first text still alone, and nothing is lost or reordered.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from tests.unit.test_openai_chat import Canned, _streamed, body, chunk, model_for, run
from vibectld.providers.aiohttp_chat import AiohttpAsyncChat
from vibectld.providers.pacing import FREE_STREAMS, MAX_REST_S, PACING, Pacing, rest

__all__ = ["model_for"]  # the fixture, used by name

WORDS = [f"w{i} " for i in range(30)]


def _paced_reply() -> list[bytes | float]:
    # The first word alone well before the others, so even a loaded machine reads it alone.
    pieces: list[bytes | float] = [body(chunk(""), chunk(WORDS[0])), 0.1]
    for word in WORDS[1:]:
        pieces += [0.01, body(chunk(word))]
    return _streamed(*pieces, body(chunk(None, "stop"), "[DONE]"))


async def _items(model: AiohttpAsyncChat) -> list[str]:
    try:
        return [text async for text in model.stream_text(model.prompt("hi", stream=True))]
    finally:
        await model.pool.aclose()


def _stream_with_others_open(
    make: Callable[[str], AiohttpAsyncChat], others: int
) -> tuple[list[str], float]:
    async def go() -> tuple[list[str], float]:
        with contextlib.ExitStack() as held:
            for _ in range(others):
                held.enter_context(PACING.stream())
            seconds = PACING.rest()
            async with Canned(lambda _: _paced_reply()) as base:
                return await _items(make(base)), seconds

    items, seconds = run(go())
    return items, seconds


def test_a_process_with_few_streams_sends_every_event_as_it_comes(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    items, _ = _stream_with_others_open(model_for, 0)
    assert "".join(items) == "".join(WORDS)
    # Not rested: about one item per event (a late read on a loaded machine may catch two).
    assert len(items) >= len(WORDS) // 2, items
    assert PACING.open == 0


def test_a_busy_process_sends_what_arrived_during_a_rest_as_one_message(
    model_for: Callable[[str], AiohttpAsyncChat],
) -> None:
    # Enough open streams for a rest of several of the provider's 10 ms paces (at least
    # two words per read however slow the machine, since both wait as long as they must).
    items, seconds = _stream_with_others_open(model_for, FREE_STREAMS * 10)
    assert seconds >= 0.1
    assert items[0] == WORDS[0]  # the first text is never held back
    assert "".join(items) == "".join(WORDS)  # nothing lost, nothing reordered
    assert len(items) < len(WORDS) // 2, items
    assert PACING.open == 0  # every stream, the held ones too, gave its place back


def test_the_rest_grows_with_open_streams_up_to_a_cap() -> None:
    pacing = Pacing()
    assert pacing.rest() == 0.0
    pacing.open = FREE_STREAMS
    assert pacing.rest() == 0.0
    pacing.open = FREE_STREAMS + 1
    low = pacing.rest()
    pacing.open = FREE_STREAMS * 4
    assert 0 < low < pacing.rest() <= MAX_REST_S
    pacing.open = 10**6
    assert pacing.rest() == MAX_REST_S


def test_a_rest_stops_reading_only_a_connection_it_paused() -> None:
    async def go() -> tuple[bool, bool, bool, bool]:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        try:
            assert isinstance(transport, asyncio.ReadTransport)
            seen: list[bool] = []
            waiting = asyncio.create_task(rest(transport, 0.05))
            await asyncio.sleep(0.01)
            seen.append(transport.is_reading())  # paused during the rest
            await waiting
            seen.append(transport.is_reading())  # and reading again after it
            transport.pause_reading()  # paused by its owner (aiohttp's flow control)
            await rest(transport, 0.01)
            seen.append(transport.is_reading())  # stays as its owner left it
            transport.resume_reading()
            await rest(None, 0.001)  # no connection (a proxy's, or gone): just the wait
            seen.append(transport.is_reading())
            return seen[0], seen[1], seen[2], seen[3]
        finally:
            transport.close()
            b.close()

    assert run(go()) == (False, True, False, True)
