"""A worker's refusal counts reach its main process as one message per loop turn
(vibectld/workers/view.py, ForwardedMetrics), over a real Channel on a real socketpair.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from vibectld.workers.channel import Channel
from vibectld.workers.view import ForwardedMetrics

Count = Callable[[ForwardedMetrics], None]


async def _unused(kind: str, body: Any) -> Any:
    raise AssertionError(f"no request expected, got {kind!r}")


def _forwarded(in_loop: Count, before_loop: Count | None = None) -> list[tuple[str, Any]]:
    """What the main process hears of a worker's metrics: `before_loop` counts with no
    event loop running, `in_loop` in one turn of the worker's loop."""
    worker_end, main_end = socket.socketpair()
    heard: list[tuple[str, Any]] = []
    worker = Channel(worker_end, _unused)
    metrics = ForwardedMetrics(worker)
    if before_loop is not None:
        before_loop(metrics)

    async def go() -> None:
        arrived = asyncio.Event()

        def told(kind: str, body: Any) -> None:
            heard.append((kind, body))
            arrived.set()

        main = Channel(main_end, _unused, told)
        await worker.start()
        await main.start()
        try:
            in_loop(metrics)
            await asyncio.wait_for(arrived.wait(), 10)
            await asyncio.sleep(0.05)  # a second message, were there one, would be here
        finally:
            await worker.close()
            await main.close()

    asyncio.run(go())
    return heard


def _refuse(*reasons: str) -> Count:
    def count(metrics: ForwardedMetrics) -> None:
        for reason in reasons:
            metrics.refusals.labels(reason).inc()

    return count


def test_refusals_of_one_loop_turn_go_as_one_message() -> None:
    heard = _forwarded(_refuse("unauthenticated", "unauthenticated", "rpm"))
    assert heard == [("refusals", {"unauthenticated": 2, "rpm": 1})]


def test_a_refusal_counted_without_a_loop_does_not_hold_back_later_ones() -> None:
    # Outside any event loop there is nothing to send a count with: it is dropped, and
    # the next loop turn's counts still go out.
    heard = _forwarded(_refuse("rpm"), before_loop=_refuse("unauthenticated"))
    assert heard == [("refusals", {"rpm": 1})]
