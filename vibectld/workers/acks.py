"""A worker's call ends OK only once the main process has journalled its usage.

A worker sends each call's usage to the main process, which counts it in memory and in
its usage journal (store/journal.py: one write, kept by the kernel if the process is
killed). Were the worker to answer first, a `kill -9` of the main process would lose the
usage of calls their clients saw complete (those still in the socket, or read and not yet
handled). So a worker holds each call's last word, its OK status (the unary reply goes
with it; a stream's client reads to the status), until the main process says the call's
records are in the journal: one acknowledgement per batch of records it handled (one
frame for every call a worker finished in a loop turn), carrying the highest record
number. The cost is that round trip on the socketpair, once per call (about 0.2-0.3 ms
at p50 for sequential echo calls on a busy 2-core machine).

If the main process dies first, which calls it journalled is read from the journal
itself: the main process writes each worker record with a tag (this worker's token and
the record's number) on its line. A call whose records are all there is counted and ends
OK; any other ends UNAVAILABLE (retryable) and is not counted, as nothing will count it.
Totals after a restart are then exactly the calls clients saw succeed. The one way left
to miss is a flush committing and deleting the segment between a line's write and its
acknowledgement, which are microseconds apart on one thread while a commit takes
milliseconds; the tags are read within a millisecond of the main process's death, long
before a new one could replay the segments.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import grpc
import structlog

from vibectld.service.gate import PROXY_METHOD_PREFIX
from vibectld.service.refusals import Unavailable, abort
from vibectld.store.base import Store
from vibectld.store.journal import UsageJournal, tags_in
from vibectld.store.registry import Registry

log = structlog.get_logger("vibectld.workers")

# The calls whose usage is journalled before they answer: the ones that record usage.
_COUNTED_METHODS = frozenset(PROXY_METHOD_PREFIX + m for m in ("Execute", "StreamExecute"))
_LOST = "this vibectld worker lost its main process before it counted the call; retry"

# The acknowledgements a call waits for, set by the call's handler and seen by the
# servicer's accounting (scheduled with call_soon, which runs in a copy of the call's
# context): each record sent while the call runs adds one.
_CALL_RECORDS: ContextVar[list[asyncio.Future[bool]] | None] = ContextVar(
    "vibectld_call_records", default=None
)


class JournalAcks:
    """The worker's half: numbers its records, and resolves each call's wait."""

    def __init__(self, journal_dir: Path) -> None:
        # Tells this worker's lines from every other's (and from an earlier incarnation's
        # in the same slot) in the shared journal.
        self.token = secrets.token_hex(6)
        self._journal_dir = journal_dir
        self._seq = 0
        self._pending: deque[tuple[int, asyncio.Future[bool]]] = deque()
        self._lost = False

    def __repr__(self) -> str:
        return f"JournalAcks(token={self.token!r}, pending={len(self._pending)})"

    def next_tag(self) -> tuple[str, int]:
        """The (token, number) of a record about to be sent; the running call, if any,
        will wait for its acknowledgement."""
        self._seq += 1
        waiting = _CALL_RECORDS.get()
        if waiting is not None:
            future = asyncio.get_running_loop().create_future()
            if self._lost:
                future.set_result(False)  # nobody left to count it
            else:
                self._pending.append((self._seq, future))
            waiting.append(future)
        return self.token, self._seq

    def journalled(self, upto: int) -> None:
        """The main process journalled every record up to `upto` (they arrive in order)."""
        pending = self._pending
        while pending and pending[0][0] <= upto:
            _, future = pending.popleft()
            if not future.done():
                future.set_result(True)

    def main_gone(self) -> None:
        """The main process is gone: each waiting record is counted iff its tagged line
        is in the journal; nothing is counted from now on."""
        self._lost = True
        if not self._pending:
            return
        prefix = f"{self.token}:"
        found = {
            int(tag[len(prefix) :])
            for tag in tags_in(self._journal_dir)
            if tag.startswith(prefix) and tag[len(prefix) :].isdigit()
        }
        counted = 0
        while self._pending:
            seq, future = self._pending.popleft()
            if not future.done():
                future.set_result(seq in found)
                counted += seq in found
        log.warning(
            "worker.usage_resolved_from_journal",
            counted=counted,
            hint="calls not in the journal end UNAVAILABLE; their clients retry",
        )

    def wrap_handler(self, method: str, handler: Any) -> Any:
        """`handler` with its OK status held until the call's usage is journalled."""
        if method not in _COUNTED_METHODS or handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _held(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _held(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def this_call_waits() -> list[asyncio.Future[bool]]:
    """From now on, in this task, each record sent adds the future of its
    acknowledgement (True: journalled; False: never will be) to the list returned."""
    waiting: list[asyncio.Future[bool]] = []
    _CALL_RECORDS.set(waiting)  # this call's task only: grpc runs each in its own
    return waiting


def _held(behavior: Callable[[Any, Any], Awaitable[Any]]) -> Callable[[Any, Any], Any]:
    async def held(request: Any, context: Any) -> Any:
        waiting = this_call_waits()
        result = await behavior(request, context)
        # The servicer counts a call on the loop's next turn (call_soon, after the reply
        # was handed back): let that run, so its records are in `waiting`.
        await asyncio.sleep(0)
        # Each future awaited in turn, not gathered: gather's wrapping future and its
        # callbacks cost more than the wait, on every call; all are still awaited.
        counted = True
        for future in waiting:
            counted = await future and counted
        if not counted:
            await abort(context, Unavailable(_LOST))
        return result

    return held


# -- the main process's half --------------------------------------------------------------


def journal_of(store: Store) -> UsageJournal | None:
    """The registry's usage journal (the daemon always opens one)."""
    return store.usage_journal() if isinstance(store, Registry) else None


@contextlib.contextmanager
def tagged(journal: UsageJournal | None, token: str, seq: int) -> Iterator[None]:
    """The lines the registry journals inside carry the worker's tag (one thread: the
    main process's loop is the only writer of usage lines)."""
    if journal is None:
        yield
        return
    journal.tag = f"{token}:{seq}"
    try:
        yield
    finally:
        journal.tag = None


def record_usage(store: Store, kind: str, fields: list[Any]) -> None:
    """A worker's `record_call` or `record_redactions`, counted in this store."""
    if kind == "record_call":
        client_id, now, error, tokens_in, tokens_out, cost = fields
        store.record_call(
            client_id,
            now=now,
            error=error,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=cost,
        )
    else:
        client_id, now, found = fields
        store.record_redactions(client_id, now=now, found=found)
