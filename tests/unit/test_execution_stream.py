"""Executor.stream coalesces chunks of a sync model that are already waiting.

A sync model runs in the executor's pool thread and hands its chunks over a queue;
whatever has queued up by the time the consumer asks again comes as one item, with
the text unchanged, and a chunk that is alone is handed over as soon as it exists.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

from vibectld.providers.catalogue import CatalogueEntry
from vibectld.providers.execution import COALESCE_CHARS, Executor, Outcome


class _Usage:
    input, output = 3, 7


class _Response:
    def __init__(self, chunks: list[str], gate: threading.Event | None) -> None:
        self.chunks, self.gate = chunks, gate

    def __iter__(self) -> Iterator[str]:
        yield self.chunks[0]
        if self.gate is not None:
            self.gate.wait(5)  # the rest only once the consumer has the first
        yield from self.chunks[1:]

    def usage(self) -> _Usage:
        return _Usage()


class _SyncModel:
    def __init__(self, chunks: list[str], gate: threading.Event | None = None) -> None:
        self.chunks, self.gate = chunks, gate

    def prompt(self, prompt: Any, **kwargs: Any) -> _Response:
        return _Response(self.chunks, self.gate)


def _entry(model: _SyncModel) -> CatalogueEntry:
    return CatalogueEntry("sync", "test", (), True, False, async_model=None, sync_model=model)


def test_chunks_already_queued_come_as_one_item_with_the_same_text() -> None:
    words = [f"w{i} " for i in range(500)]
    gate = threading.Event()

    async def go() -> tuple[list[str], Outcome]:
        executor, outcome = Executor(1), Outcome("sync")
        items: list[str] = []
        try:
            async for text in executor.stream(
                _entry(_SyncModel(words, gate)), [], ["hi"], None, outcome
            ):
                items.append(text)
                if len(items) == 1:
                    gate.set()
                    await asyncio.sleep(0.2)  # a slow consumer: the rest queue up meanwhile
        finally:
            executor.close()
        return items, outcome

    items, outcome = asyncio.run(go())
    assert items[0] == "w0 "  # alone, so handed over at once
    assert "".join(items) == "".join(words)
    assert len(items) < 10, len(items)
    assert (outcome.input_tokens, outcome.output_tokens) == (3, 7)


def test_a_lone_chunk_is_not_held_for_the_next() -> None:
    gate = threading.Event()

    async def go() -> float:
        executor = Executor(1)
        started = time.monotonic()
        try:
            stream = executor.stream(
                _entry(_SyncModel(["a", "b"], gate)), [], ["hi"], None, Outcome("sync")
            )
            assert await anext(stream) == "a"
            waited = time.monotonic() - started
            gate.set()
            assert [t async for t in stream] == ["b"]
        finally:
            executor.close()
        return waited

    assert asyncio.run(go()) < 2.0  # not the 5 s the model would otherwise wait


def test_what_is_coalesced_stays_far_below_the_message_limit() -> None:
    words = ["x" * 1000] * 1000  # 1 MB queued at once
    gate = threading.Event()

    async def go() -> list[str]:
        executor = Executor(1)
        items: list[str] = []
        try:
            async for text in executor.stream(
                _entry(_SyncModel(words, gate)), [], ["hi"], None, Outcome("sync")
            ):
                items.append(text)
                if len(items) == 1:
                    gate.set()
                    await asyncio.sleep(0.2)
        finally:
            executor.close()
        return items

    items = asyncio.run(go())
    assert "".join(items) == "".join(words)
    assert max(len(t) for t in items) <= COALESCE_CHARS + 1000
    assert len(items) < 100
