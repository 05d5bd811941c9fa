"""The main process's client writes and key changes, pushed to every worker.

A write made here (an admin operation, or another node's change brought by the feed)
reaches every worker, and each worker cancels the calls it must, before the operation
answers: so a worker can admit a call with nothing to decide in the main process from
its own, current copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog

from vibectld.runtime import Runtime
from vibectld.workers.channel import ChannelClosed, Failed
from vibectld.workers.slots import WorkersInFlight, WorkerSlot
from vibectld.workers.view import keys_to_wire

log = structlog.get_logger("vibectld.workers")

# How long a client or key change may wait for every worker's acknowledgement.
PUSH_TIMEOUT_SECONDS = 5.0


class Pushes:
    """Pushes to the workers in `slots`; `loop` and `inflight` are set once the main
    process's runtime exists."""

    def __init__(self, slots: list[WorkerSlot]) -> None:
        self._slots = slots
        self.loop: asyncio.AbstractEventLoop | None = None
        self.inflight: WorkersInFlight | None = None

    def __repr__(self) -> str:
        return f"Pushes(workers={len(self._slots)})"

    def wrap_writers(self, rt: Runtime) -> None:
        """Every client write and key change of this process reaches every worker before
        the admin operation that made it answers (its writers run in threads)."""
        registry = rt.registry
        for name in ("issue", "revoke", "update"):
            original = getattr(registry, name)

            def written(*args: Any, _original: Callable[..., Any] = original, **kw: Any) -> Any:
                record = _original(*args, **kw)
                self.push_and_wait("client", record)
                return record

            setattr(registry, name, written)
        signing = rt.signing
        # refresh: another node's rotation or retirement, brought by the change feed.
        for name in ("rotate", "retire", "refresh"):
            original = getattr(signing, name)

            def changed(*args: Any, _original: Callable[..., Any] = original, **kw: Any) -> Any:
                try:
                    return _original(*args, **kw)
                finally:
                    self.push_and_wait("keys", keys_to_wire(signing.loaded()))

            setattr(signing, name, changed)

    def push_and_wait(self, kind: str, body: Any) -> None:
        loop = self.loop
        assert loop is not None
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            # On the loop itself (not the admin routes' way): cannot wait here.
            loop.create_task(self.push(kind, body))
            return
        future = asyncio.run_coroutine_threadsafe(self.push(kind, body, report=True), loop)
        future.result(PUSH_TIMEOUT_SECONDS + 1)

    async def push(self, kind: str, body: Any, report: bool = False) -> None:
        """To every worker that has a channel; a worker that does not answer in time is
        logged (a worker started later gets a snapshot that has the change). With
        `report`, the calls the workers cancelled are kept for the admin route's answer."""

        async def one(slot: WorkerSlot) -> int:
            channel = slot.channel
            if channel is None or channel.closed.is_set():
                return 0
            try:
                return int(await channel.ask(kind, body, within=PUSH_TIMEOUT_SECONDS))
            except (ChannelClosed, Failed, TimeoutError) as e:
                log.warning("worker.push_failed", worker=slot.index, kind=kind, error=str(e))
                return 0

        cancelled = sum(await asyncio.gather(*(one(slot) for slot in self._slots)))
        if report and kind == "client" and cancelled:
            assert self.inflight is not None
            self.inflight.cancelled_in_workers[body.id] += cancelled
