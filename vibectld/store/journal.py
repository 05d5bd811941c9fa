"""The usage journal: each counted call also goes to a file at once, so that a node killed
with -9 loses the usage of no call it served, only of the calls in flight when it died.

Usage is counted in memory and written to the database as increments every few seconds
(writethrough.py). Alongside, `record_call` and `record_redactions` append one line per
call to the journal's current segment: one `os.write` on an O_APPEND descriptor, no
fsync. The kernel keeps what a killed process wrote; a machine that crashes may lose the
unsynced tail (a few seconds, as without the journal).

Each flush starts a new segment at the moment it takes the counts from memory (under
the memory lock), so the segments it closes hold exactly the calls it writes, plus those
of earlier flushes that failed and put their counts back. In the flush's transaction it
records the highest segment applied for this journal (`usage_journals`); after the commit
it deletes the segments. At start, segments left by a run that did not finish are
replayed into the database as increments in one transaction with the same record, then
deleted, so a crash between a commit and the deletion never counts a call twice: a
segment at or below the recorded number is only deleted.

With worker processes (workers/journal_files.py), each worker also appends its calls to
files of its own under `workers/`, each line tagged with the worker's token and the
record's number (`c@TOKEN:SEQ`); the main process writes the same tag on the line of each
worker record it journals, and starts every segment with a header line (`#journalled`)
giving, per token of this run, the highest record it has journalled. A start counts a
worker's line only if the main process's leftovers show it never journalled it
(`journalled`, `read`).

A journal is named by a random identity kept in its directory (state_dir/usage-journal,
0700; files 0600: they hold client ids and counts, never a secret), so each node on a
shared database has its own record. One process at a time holds a journal (flock): a
second daemon on the same state directory would otherwise replay the first one's live
segments.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vibectld.store import usage
from vibectld.store.records import StorageFailure

DIRECTORY = "usage-journal"  # under the state directory

# Schema version 6 (SQLite; PostgreSQL's version 2): per journal, the highest segment
# whose calls the database holds. Never edit once shipped.
SCHEMA_V6 = (
    """
    CREATE TABLE usage_journals (
        journal TEXT PRIMARY KEY NOT NULL,  -- the journal directory's identity
        applied INTEGER NOT NULL,  -- segments up to this one are in the usage tables
        at INTEGER NOT NULL  -- unix time of the flush or replay that applied it
    )
    """,
)
APPLIED_SQL = "SELECT applied FROM usage_journals WHERE journal = ?"
MARK_SQL = (
    "INSERT INTO usage_journals (journal, applied, at) VALUES (?, ?, ?) "
    "ON CONFLICT (journal) DO UPDATE SET applied = excluded.applied, at = excluded.at"
)

_SEGMENT = re.compile(r"([0-9]{12})\.log")
WORKERS = "workers"  # under the journal: each worker process's own files
_WORKER_FILE = re.compile(r"([0-9a-f]{12})-([0-9]+)\.log")
# A segment's first line: per worker token, the highest record journalled so far.
_HEADER = "#journalled"
_IDENTITY = "identity"
_LOCK = "lock"
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC


class JournalBusy(StorageFailure):
    """Another process holds this journal."""


@dataclass
class Replayed:
    """What a journal's leftover segments hold, as a flush would write it."""

    counters: dict[str, tuple[int, int]]  # client id -> (calls, latest call's time)
    deltas: dict[usage.Key, usage.Counts]
    redactions: dict[tuple[str, int, str], int]
    upto: int  # the highest segment read (0: none)
    skipped: int  # lines that were not whole records (a torn write)
    from_workers: int = 0  # worker lines counted: calls the main process never journalled


class UsageJournal:
    """One directory of segments; `call`/`redactions` append, a flush `rotate`s and
    `discard`s. Not thread-safe: the registry calls it under its memory lock (appends,
    `rotate`, `close`) or its database lock (`discard`; a flush holds both in turn)."""

    def __init__(self, directory: Path, identity: str, lock_fd: int) -> None:
        self.directory = directory
        self.identity = identity
        self._lock_fd: int | None = lock_fd
        self._fd: int | None = None
        self._seq = 0  # the current segment
        self._closed: list[int] = []  # closed segments not yet known to be applied
        self.unwritten = 0  # records a write failed for (counted in memory only)
        # Set by a main process with workers around one worker's record (token, number):
        # written on its line, and the highest per token kept in `marks` (under the memory
        # lock, as the write), which each new segment's header repeats: a start then knows
        # which worker lines this process journalled, after their segments are deleted.
        self.tag: tuple[str, int] | None = None
        self.marks: dict[str, int] = {}
        self._header_size = 0  # the current segment's header (0: none, or no segment)

    def __repr__(self) -> str:
        return f"UsageJournal({str(self.directory)!r}, segment={self._seq})"

    @classmethod
    def open(cls, directory: Path) -> UsageJournal:
        """The journal in `directory` (made 0700 if needed), held by this process."""
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if directory.stat().st_mode & 0o777 != 0o700:
                directory.chmod(0o700)
            lock_fd = os.open(directory / _LOCK, _FLAGS, 0o600)
        except OSError as e:
            raise StorageFailure(f"cannot open the usage journal {directory}: {e.strerror}") from e
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise JournalBusy(
                f"another vibectld uses the usage journal in {directory}; stop it, or give "
                "this one its own state_dir"
            ) from None
        try:
            identity = _identity(directory)
        except OSError as e:
            os.close(lock_fd)
            raise StorageFailure(f"cannot open the usage journal {directory}: {e.strerror}") from e
        return cls(directory, identity, lock_fd)

    def leftovers(self) -> list[int]:
        """The segments on disk, oldest first (a new journal's: none)."""
        found = (_SEGMENT.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def read(
        self,
        segments: Iterable[int],
        workers: Iterable[Path] = (),
        marks: dict[str, int] | None = None,
    ) -> Replayed:
        """The counts in `segments`, summed as the memory mirror sums them, with the lines
        of the worker files `workers` that this journal never held: numbered above their
        token's mark in `marks` (`journalled`), or of a token it has no mark for."""
        book = usage.UsageBook()
        counters: dict[str, tuple[int, int]] = {}
        upto = skipped = from_workers = 0
        for seq in segments:
            upto = max(upto, seq)
            for line in _lines(self._path(seq)):
                if line is None:
                    skipped += 1
                elif not line.startswith(b"#"):
                    skipped += _counted(line, book, counters)
        known = marks or {}
        for path in workers:
            for line in _lines(path):
                tag = None if line is None else _tag_of(line)
                if line is None or tag is None:
                    skipped += 1
                elif tag[1] > known.get(tag[0], 0):
                    torn = _counted(line, book, counters)
                    skipped += torn
                    from_workers += 1 - torn
        return Replayed(
            counters, book.take_deltas(), book.take_redactions(), upto, skipped, from_workers
        )

    def journalled(self, segments: Iterable[int]) -> dict[str, int]:
        """Per worker token, the highest record `segments` show journalled: the headers'
        marks and the tagged lines. A token's records arrive in order, so every record up
        to its mark was journalled here (in these segments, or in flushed ones)."""
        marks: dict[str, int] = {}
        for seq in segments:
            for line in _lines(self._path(seq)):
                if line is None:
                    continue
                if line.startswith(_HEADER.encode()):
                    found = [_split_tag(t) for t in line.split(b"\t")[1:]]
                else:
                    found = [_tag_of(line)]
                for tag in found:
                    if tag is not None and tag[1] > marks.get(tag[0], 0):
                        marks[tag[0]] = tag[1]
        return marks

    def worker_files(self, token: str | None = None) -> list[Path]:
        """The worker files in this journal (only `token`'s, if given)."""
        try:
            paths = list((self.directory / WORKERS).iterdir())
        except OSError:
            return []
        return [
            p
            for p in paths
            if (m := _WORKER_FILE.fullmatch(p.name)) and token in (None, m.group(1))
        ]

    def forget_worker(self, token: str) -> bool:
        """Delete a dead worker's files, whose every record reached this process or was
        never announced (its channel was read to its end); False if one stays."""
        left = not all([remove(path) for path in self.worker_files(token)])
        if not left:
            # Its mark is needed no longer (an atomic pop: a flush thread may copy marks).
            self.marks.pop(token, None)
        return not left

    def forget(self, segments: Iterable[int]) -> None:
        """Delete segments the database holds (a replay or a flush has committed them).

        One that cannot be deleted stays, harmlessly: the database's record says it is
        applied, so no later start replays it (storage migrate copies the record too).
        """
        for seq in segments:
            with contextlib.suppress(OSError):
                self._path(seq).unlink()

    def start(self, after: int) -> None:
        """Write from segment `after` + 1 on."""
        self._seq = after
        self._open_next()

    # -- the request path: one line, one write ----------------------------------------

    def call(self, client_id: str, now: int, c: usage.Counts) -> None:
        self._write(call_line(client_id, now, c, self._tagged()))

    def redactions(self, client_id: str, now: int, found: dict[str, int]) -> None:
        if found:
            self._write(redactions_line(client_id, now, found, self._tagged()))

    def _tagged(self) -> tuple[str, int] | None:
        tag = self.tag
        if tag is not None:
            self.marks[tag[0]] = tag[1]  # under the memory lock, as `rotate` reads it
        return tag

    def _write(self, line: str) -> None:
        if self._fd is None:
            self.unwritten += 1
            return
        data = line.encode()
        try:
            # A regular file takes the whole line or fails; a short write (a full disk)
            # leaves a torn line that `read` skips.
            if os.write(self._fd, data) != len(data):
                self.unwritten += 1
        except OSError:
            self.unwritten += 1  # the call is still counted in memory: never fail it

    # -- flushes ------------------------------------------------------------------------

    def rotate(self) -> int:
        """Close the current segment and start the next; the highest closed segment,
        which a flush of the counts taken now covers (with every earlier closed one)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._closed.append(self._seq)
        self._open_next()
        return self._seq - 1

    def take_unwritten(self) -> int:
        """How many calls the journal failed to write since the last ask (a full disk,
        say): counted in memory only, so lost if the node is then killed."""
        taken, self.unwritten = self.unwritten, 0
        return taken

    def discard(self, upto: int) -> None:
        """Delete the closed segments up to `upto`, whose calls the database now holds.

        Kept while no current segment carries the marks (it could not be opened): their
        tags are then the one record of which worker lines this process journalled."""
        if self.marks and self._header_size == 0:
            return
        self.forget(seq for seq in self._closed if seq <= upto)
        self._closed = [seq for seq in self._closed if seq > upto]

    def close(self) -> None:
        """Stop writing; the current segment goes if empty (the last flush covered all)."""
        if self._fd is not None:
            # Empty: no record past the header, and no worker file the marks still speak for.
            empty = os.fstat(self._fd).st_size == self._header_size and not self.marks
            os.close(self._fd)
            self._fd = None
            if empty:
                with contextlib.suppress(FileNotFoundError):
                    self._path(self._seq).unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _open_next(self) -> None:
        self._seq += 1
        self._header_size = 0
        try:
            self._fd = os.open(self._path(self._seq), _FLAGS | os.O_EXCL, 0o600)
        except OSError:
            # No segment: calls until the next rotate are counted in memory only (lost
            # if the node is killed), never twice (they are in no covered segment).
            self._fd = None
            return
        marks = self.marks.copy()  # one C-level copy: atomic against a concurrent pop
        if not marks:
            return
        header = "\t".join([_HEADER, *(f"{t}:{n}" for t, n in marks.items())]) + "\n"
        data = header.encode()
        try:
            written = os.write(self._fd, data)
        except OSError:
            written = 0
        if written == len(data):
            self._header_size = written

    def _path(self, seq: int) -> Path:
        return self.directory / f"{seq:012d}.log"


def call_line(client_id: str, now: int, c: usage.Counts, tag: tuple[str, int] | None) -> str:
    """One counted call's journal line (a worker's files use the same)."""
    return (
        f"{_kind('c', tag)}\t{client_id}\t{now}\t{c.errors}\t{c.input_tokens}\t"
        f"{c.output_tokens}\t{c.cost_usd!r}\n"
    )


def redactions_line(
    client_id: str, now: int, found: dict[str, int], tag: tuple[str, int] | None
) -> str:
    kinds = "\t".join(f"{kind}\t{n}" for kind, n in found.items())
    return f"{_kind('r', tag)}\t{client_id}\t{now}\t{kinds}\n"


def _kind(kind: str, tag: tuple[str, int] | None) -> str:
    return kind if tag is None else f"{kind}@{tag[0]}:{tag[1]}"


def remove(path: Path) -> bool:
    """Delete `path`; True unless it is still there (gone already counts as deleted)."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _lines(path: Path) -> Iterator[bytes | None]:
    """A file's whole lines; None for a last line without its newline (torn)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    *lines, tail = data.split(b"\n")
    yield from lines
    if tail:
        yield None


def _tag_of(line: bytes) -> tuple[str, int] | None:
    return _split_tag(line.partition(b"\t")[0].partition(b"@")[2])


def _split_tag(text: bytes) -> tuple[str, int] | None:
    token, _, seq = text.partition(b":")
    return (token.decode(errors="replace"), int(seq)) if token and seq.isdigit() else None


def _counted(line: bytes, book: usage.UsageBook, counters: dict[str, tuple[int, int]]) -> int:
    """Count one line; 1 if it is not a whole record (skipped), else 0."""
    try:
        _apply(line.decode(), book, counters)
    except (ValueError, IndexError, UnicodeDecodeError):
        return 1
    return 0


def _identity(directory: Path) -> str:
    path = directory / _IDENTITY
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if re.fullmatch(r"[0-9a-f]{32}", text):
        return text
    text = secrets.token_hex(16)
    tmp = directory / f".{_IDENTITY}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{text}\n".encode())
        os.fsync(fd)  # written once per state directory: worth making it durable
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return text


def _apply(line: str, book: usage.UsageBook, counters: dict[str, tuple[int, int]]) -> None:
    """Count one journal line into `book` and `counters`; ValueError or IndexError if it
    is not one."""
    fields = line.split("\t")
    kind, client_id, now = fields[0].partition("@")[0], fields[1], int(fields[2])
    if kind == "c" and len(fields) == 7:
        c = usage.Counts(1, int(fields[3]), int(fields[4]), int(fields[5]), float(fields[6]))
        book.record(client_id, now, c)
        calls, seen = counters.get(client_id, (0, now))
        counters[client_id] = (calls + 1, max(seen, now))
    elif kind == "r" and len(fields) > 3 and len(fields) % 2 == 1:
        found = dict(zip(fields[3::2], map(int, fields[4::2]), strict=True))
        book.record_redactions(client_id, now, found)
    else:
        raise ValueError(line)
