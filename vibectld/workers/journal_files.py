"""Each worker journals its own calls' usage, so none waits for the main process.

A worker sends each call's usage to the main process, which counts it in memory and in
its usage journal (store/journal.py: one write, kept by the kernel if the process is
killed). Answering first would lose, on a `kill -9` of the main process, the usage of
calls their clients saw complete (records still in the socket, or read and not handled).
So the worker first appends the record to a file of its own (`WorkerJournal`: under the
journal directory, workers/TOKEN-N.log, 0600, one `write` per record, the main
journal's line format tagged `TOKEN:SEQ`: this process's random token and the record's
number), then sends it to the main process, and only then does the call's status go
(`recorded_first`: one turn of the worker's own loop, no round trip).

The main process writes each worker record with the same tag on its line, and each
segment it starts begins with a header giving, per token of its run, the highest record
journalled so far (store/journal.py). One worker's records arrive in order on one
channel, so what the main process journalled of a token is every record up to its mark.
At the next start, the replay of the main journal (one transaction, the same applied
mark) also counts each worker line numbered above its token's mark: the calls a worker
answered that the main process never journalled; then the worker files are deleted.

The main process acknowledges what it journalled ("journalled" up to a number, with
each ping, every PING_SECONDS) only so that a worker can delete its files: a file goes
once every record in it is acknowledged, and the worker starts a new file when the
current one is a second old or a MiB long, so each worker keeps a few small files.

A worker that dies while the main process lives: once its channel is read to the end,
every record it told is journalled there, and a line beyond it in its files was written
but never sent, so its call never answered (the send comes first): the main process
deletes that worker's files uncounted (`UsageJournal.forget_worker`).

What is left to miss:
- A worker killed -9 between writing a record and sending it (microseconds): its call
  did not answer, yet if the main process is killed too before it handles the worker's
  death (milliseconds: the exit, then the channel read to its end), the next start
  counts it.
- A worker killed -9 after sending a record, before gRPC put the status on the wire
  (microseconds): counted, though its client saw the call fail, as on one process.
- A worker still serving after its main process was killed, when the next main process
  starts: what it writes after that start's replay is lost (systemd stops every process
  of the unit first; a worker stops on its own once its calls end, within the grace).
- A worker file the replay counted but could not delete (its directory made read-only
  by hand) would be counted again by a later start.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import structlog

from vibectld.service.gate import PROXY_METHOD_PREFIX
from vibectld.store import usage
from vibectld.store.base import Store
from vibectld.store.journal import WORKERS, UsageJournal, call_line, redactions_line, remove
from vibectld.store.registry import Registry

log = structlog.get_logger("vibectld.workers")

# A file all of whose records are acknowledged is left for a new one past either.
ROTATE_SECONDS = 1.0
ROTATE_BYTES = 1 << 20
# The calls that record usage: their status waits for the record (`recorded_first`).
_COUNTED_METHODS = frozenset(PROXY_METHOD_PREFIX + m for m in ("Execute", "StreamExecute"))
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


class WorkerJournal:
    """The worker's half: numbers its records and appends each to its own file."""

    def __init__(self, journal_dir: Path, token: str | None = None) -> None:
        # Tells this worker's lines from every other's (and from an earlier incarnation's
        # in the same slot).
        self.token = token or new_token()
        self.directory = journal_dir / WORKERS
        self._seq = 0
        self._fd: int | None = None
        self._file = 0  # the current file's number (its name's N)
        self._opened_at = 0.0
        self._size = 0
        self._top = 0  # the highest record in the current file
        self._closed: list[tuple[Path, int]] = []  # files left, each with its highest
        self._acknowledged = 0
        self._failing = False

    def __repr__(self) -> str:
        return f"WorkerJournal(token={self.token!r}, seq={self._seq})"

    def call(self, client_id: str, now: int, c: usage.Counts) -> tuple[str, int]:
        """Number and write one call's record; its (token, number), for the main process."""
        self._seq += 1
        self._write(call_line(client_id, now, c, (self.token, self._seq)))
        return self.token, self._seq

    def redactions(self, client_id: str, now: int, found: dict[str, int]) -> tuple[str, int]:
        self._seq += 1
        if found:
            self._write(redactions_line(client_id, now, found, (self.token, self._seq)))
        return self.token, self._seq

    def _write(self, line: str) -> None:
        if self._fd is None and not self._open():
            return
        assert self._fd is not None
        data = line.encode()
        try:
            written = os.write(self._fd, data)
        except OSError as e:
            written = 0
            self._failed(str(e.strerror or e))
        self._size += written
        self._top = self._seq

    def _open(self) -> bool:
        self._file += 1
        path = self._path(self._file)
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
            self._fd = os.open(path, _FLAGS, 0o600)
        except OSError as e:
            self._failed(str(e.strerror or e))
            return False
        self._opened_at = time.monotonic()
        self._size = 0
        return True

    def _failed(self, why: str) -> None:
        # The main process still counts the call when told; only its kill -9 loses it.
        if not self._failing:
            self._failing = True
            log.warning(
                "worker.usage_file_failed",
                directory=str(self.directory),
                error=why,
                hint="a kill -9 of the main process may lose these calls' usage; check "
                "free space and permissions in the state directory",
            )

    def journalled(self, upto: int) -> None:
        """The main process journalled every record up to `upto`: delete the files that
        hold only those; start a new file when the current one is old or long enough."""
        self._acknowledged = max(self._acknowledged, upto)
        keep = []
        for path, top in self._closed:
            if top > self._acknowledged or not remove(path):
                keep.append((path, top))
        self._closed = keep
        if self._fd is None:
            return
        age = time.monotonic() - self._opened_at
        if age < ROTATE_SECONDS and self._size < ROTATE_BYTES:
            return
        os.close(self._fd)
        self._fd = None
        path = self._path(self._file)
        if self._top > self._acknowledged or not remove(path):
            self._closed.append((path, self._top))

    def files(self) -> list[Path]:
        """This worker's files on disk now."""
        return sorted(self.directory.glob(f"{self.token}-*.log"))

    def close(self) -> None:
        """Stop writing; the files stay (the main process or the next start decides)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _path(self, n: int) -> Path:
        return self.directory / f"{self.token}-{n}.log"


def new_token() -> str:
    return secrets.token_hex(6)


def recorded_first(send: Callable[[], None]) -> Callable[[str, Any], Any]:
    """A Runtime.wrap_handler for a worker: each counted call's status goes only once its
    usage is in this worker's file and `send` has sent it to the main process."""

    def wrap(method: str, handler: Any) -> Any:
        if method not in _COUNTED_METHODS or handler is None:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _recorded(handler.unary_unary, send),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _recorded(handler.unary_stream, send),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    return wrap


def _recorded(
    behavior: Callable[[Any, Any], Awaitable[Any]], send: Callable[[], None]
) -> Callable[[Any, Any], Any]:
    async def recorded(request: Any, context: Any) -> Any:
        result = await behavior(request, context)
        # The servicer records a call on the loop's next turn (call_soon, scheduled before
        # the handler returned): let it write its line, then send what it told at once.
        await asyncio.sleep(0)
        send()
        return result

    return recorded


# -- the main process's half --------------------------------------------------------------


def journal_of(store: Store) -> UsageJournal | None:
    """The registry's usage journal (the daemon always opens one)."""
    return store.usage_journal() if isinstance(store, Registry) else None


@contextlib.contextmanager
def tagged(journal: UsageJournal | None, tag: tuple[str, int] | None) -> Iterator[None]:
    """The lines the registry journals inside carry the worker's tag (one thread: the
    main process's loop is the only writer of usage lines)."""
    if journal is None or tag is None:
        yield
        return
    journal.tag = tag
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
