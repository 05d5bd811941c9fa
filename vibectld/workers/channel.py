"""The private channel between the main process and one worker: pickled frames.

A socketpair made by the main process, one end inherited by the worker (its file
descriptor number is passed on the command line). Each frame is a 4-byte big-endian
length and a pickled `(kind, id, body)` tuple. Pickle is safe here because both ends
are our own processes, the same code and the same user, and the socket is private (no
path, no other process can connect to it); it saves a schema for client records and
refusals that already are Python objects.

A request carries an id and its answer carries the same id; a message with id 0
needs no answer. Either side may ask, so each end runs one reader task that hands
answers to their waiters and requests to the handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

log = structlog.get_logger("vibectld.workers")

_HEADER = struct.Struct(">I")
# Far above any message we send (a snapshot of 100,000 client records is ~30 MB).
MAX_FRAME_BYTES = 512 * 1024 * 1024

Handler = Callable[[str, Any], Awaitable[Any]]


class ChannelClosed(Exception):
    """The other process is gone (or closed its end)."""


class Failed(Exception):
    """The other side's handler raised; the message is its `str()`."""


class Channel:
    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        told: Callable[[str, Any], None] | None = None,
    ) -> None:
        self._sock = sock
        self._handler = handler
        # Messages sent with tell(), handled at once on the reader's turn (no task each);
        # without it they go to `handler` as requests that need no answer.
        self._on_told = told
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._told: list[tuple[str, Any]] = []

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            sock=self._sock, limit=MAX_FRAME_BYTES
        )
        self._task = asyncio.create_task(self._read(), name="worker-channel")

    def _send(self, kind: str, ident: int, body: Any) -> None:
        if self._writer is None or self.closed.is_set():
            raise ChannelClosed("the channel is closed")
        data = pickle.dumps((kind, ident, body), protocol=pickle.HIGHEST_PROTOCOL)
        self._writer.write(_HEADER.pack(len(data)) + data)

    def tell(self, kind: str, body: Any = None) -> None:
        """Send without waiting for an answer (usage counts, metrics). Sent together at the
        loop's next turn: a busy worker's many calls cost one write, not one each."""
        if self._writer is None or self.closed.is_set():
            raise ChannelClosed("the channel is closed")
        if not self._told:
            asyncio.get_running_loop().call_soon(self.flush)
        self._told.append((kind, body))

    def flush(self) -> None:
        """Send what `tell` holds now rather than at the loop's next turn."""
        if not self._told:
            return  # sent already, ahead of a request
        told, self._told = self._told, []
        with contextlib.suppress(ChannelClosed):
            self._send("batch", 0, told)

    async def ask(self, kind: str, body: Any = None, within: float | None = None) -> Any:
        """Send and wait for the answer; raises Failed, ChannelClosed or TimeoutError."""
        ident = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        try:
            if self._told:
                self.flush()  # in order: a slot given back before the next admission
            self._send(kind, ident, body)
            async with asyncio.timeout(within):
                return await future
        finally:
            self._waiting.pop(ident, None)

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(_HEADER.size)
                (size,) = _HEADER.unpack(header)
                kind, ident, body = pickle.loads(await self._reader.readexactly(size))  # noqa: S301 - our own process, private socket
                if kind == "answer" or kind == "failed":
                    future = self._waiting.get(ident)
                    if future is not None and not future.done():
                        if kind == "answer":
                            future.set_result(body)
                        else:
                            future.set_exception(Failed(body))
                    continue
                if kind == "batch":
                    for told_kind, told_body in body:
                        self._told_one(told_kind, told_body)
                else:
                    self._dispatch(kind, ident, body)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            self._close()

    def _told_one(self, kind: str, body: Any) -> None:
        if self._on_told is None:
            self._dispatch(kind, 0, body)
            return
        try:
            self._on_told(kind, body)
        except Exception:
            log.exception("worker_channel.handler_failed", kind=kind)

    def _dispatch(self, kind: str, ident: int, body: Any) -> None:
        task = asyncio.create_task(self._handle(kind, ident, body))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, kind: str, ident: int, body: Any) -> None:
        try:
            result = await self._handler(kind, body)
        except Exception as e:
            if ident:
                with contextlib.suppress(ChannelClosed):
                    self._send("failed", ident, str(e))
            else:
                log.exception("worker_channel.handler_failed", kind=kind)
            return
        if ident:
            with contextlib.suppress(ChannelClosed):
                self._send("answer", ident, result)

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed("the other process is gone"))
        if self._writer is not None:
            self._writer.close()

    async def close(self) -> None:
        self._close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
