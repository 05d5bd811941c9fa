"""The change feed's listener: how a node hears of other nodes' changes (PostgreSQL only).

One daemon thread per Registry on a shared database, on a connection of its own
(autocommit, `LISTEN vibectld_changes`): never the registry's connection nor its
`_db_lock`, so a slow usage flush or admin write cannot hold back a revocation.

The loop waits for a notification and then reads the feed after the last id it has
seen (feed.py: ids are in commit order, so that read never skips a late commit). A
notification wakes it at once; without one it reads anyway every CATCH_UP_SECONDS, so a
notification lost with a dropped connection costs at most that long, and `fresh_at`
(the start of the last successful read) is a real measure of how old the view is. A
broken connection is replaced with backoff (BACKOFF_FIRST_SECONDS doubling to
BACKOFF_MAX_SECONDS), listened on again and caught up. If the feed rows after the last
id seen were pruned meanwhile (the node was away longer than feed.RETENTION_SECONDS),
every client is read again instead. The counts of each (`failures`, `reconnects`,
`reloads`) and whether it is connected now are plain attributes, read by the metrics
(ops/metrics.py) at each scrape: ints and a bool, written by this thread only.

What the feed says is handed to a `FeedSink` (the Registry) from this thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from vibectld.store import feed
from vibectld.store.postgresql import Connection, PostgreSQLDatabase, translate

log = structlog.get_logger("vibectld.feed")

CATCH_UP_SECONDS = 0.5  # the longest a lost notification can hold back a change
WAIT_SLICE_SECONDS = 0.1  # how soon `stop` is noticed while waiting
BACKOFF_FIRST_SECONDS = 0.1
BACKOFF_MAX_SECONDS = 2.0
# A network that drops packets silently would otherwise hold a catch-up read for
# minutes (the kernel's retransmission timeout): TCP keepalives and a send timeout end
# it within ~10 s, and the loop reconnects. The connection string's own values win.
_LIVENESS = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10_000,  # ms
}
# Kids of every signing key, handed to `keys_changed` after a full reload: a pruned gap
# may have hidden a rotation or a retirement.
_KIDS_SQL = "SELECT kid FROM signing_keys ORDER BY kid"


@dataclass(frozen=True)
class FeedSink:
    """Where the listener delivers the feed (the Registry); called from its thread."""

    # (change id, client id) of each client change, and the rows of those clients,
    # read after the changes.
    clients_changed: Callable[[Sequence[tuple[int, str]], list[tuple[Any, ...]]], None]
    # Kids of signing keys made, retired or otherwise changed.
    keys_changed: Callable[[Sequence[str]], None]
    # Every client's row, read again after a gap in the feed.
    reloaded: Callable[[list[tuple[Any, ...]]], None]


class FeedListener:
    """The thread that follows the feed; `start` once, `stop` once."""

    def __init__(
        self, db: PostgreSQLDatabase, sink: FeedSink, *, last: int, clients_sql: str
    ) -> None:
        given = conninfo_to_dict(db.conninfo)
        liveness = {k: v for k, v in _LIVENESS.items() if k not in given}
        self._conninfo = make_conninfo(db.conninfo, **liveness)  # a secret: never shown
        self._where = db.where
        self._clean = db.clean
        self._sink = sink
        self._clients_sql = clients_sql  # SELECT <the clients' columns> FROM clients
        self._last = last
        self._fresh_at = time.time()  # the caller read every client just now
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vibectld-feed", daemon=True)
        self.reloads = 0  # full reloads after a gap in the feed
        self.failures = 0  # connections lost, and attempts to open one that failed
        self.reconnects = 0  # connected and caught up again after a failure
        self.connected = False  # listening and caught up, on a connection that works

    def __repr__(self) -> str:
        return f"FeedListener({self._where!r}, last={self._last})"

    @property
    def fresh_at(self) -> float:
        """Unix time at which the last successful read of the feed began."""
        return self._fresh_at

    @property
    def last(self) -> int:
        """The last change id delivered."""
        return self._last

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end and wait for it (a read in progress is let finish)."""
        self._stopping.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_FIRST_SECONDS
        failing = False
        while not self._stopping.is_set():
            try:
                with self._connect() as conn:
                    self._catch_up(conn)  # what was committed while not listening
                    self.connected = True
                    if failing:
                        self.reconnects += 1
                        log.info("feed.reconnected", database=self._where)
                        failing = False
                    backoff = BACKOFF_FIRST_SECONDS
                    self._follow(conn)
            except Exception as e:  # a bug must not end the thread: revocations need it
                self.connected = False
                self.failures += 1
                if not failing:
                    # Once per outage; `freshness` shows how long it lasts.
                    log.warning(
                        "feed.disconnected",
                        database=self._where,
                        error=self._clean(e)
                        if isinstance(e, psycopg.Error)
                        else f"{type(e).__name__}: {e}",
                        hint="other nodes' changes reach this node again once PostgreSQL "
                        "answers; status shows how old the view is",
                    )
                    failing = True
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX_SECONDS)

    def _connect(self) -> Connection:
        conn = psycopg.connect(self._conninfo, autocommit=True)
        try:
            # Before the catch-up read: a change committed after it wakes the loop.
            conn.execute(f"LISTEN {feed.CHANNEL}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _follow(self, conn: Connection) -> None:
        due = time.monotonic() + CATCH_UP_SECONDS
        while not self._stopping.is_set():
            wait = max(0.0, min(WAIT_SLICE_SECONDS, due - time.monotonic()))
            # The payload is only a wake-up; list() lets the generator finish its packet.
            woken = list(conn.notifies(timeout=wait, stop_after=1))
            if woken or time.monotonic() >= due:
                # Notifications already here are answered by the read that follows.
                list(conn.notifies(timeout=0))
                self._catch_up(conn)
                due = time.monotonic() + CATCH_UP_SECONDS

    def _catch_up(self, conn: Connection) -> None:
        started = time.time()
        last = self._last
        rows = conn.execute(translate(feed.SINCE_SQL), (last,)).fetchall()
        if rows and rows[0][0] > last + 1:
            oldest = conn.execute(feed.OLDEST_SQL).fetchone()
            if feed.missed(last, rows[0][0], oldest, started):
                self._reload(conn, started)
                return
        clients = [(int(i), key) for i, kind, key in rows if kind == feed.CLIENT]
        if clients:
            ids = sorted({key for _, key in clients})
            found = conn.execute(f"{self._clients_sql} WHERE id = ANY(%s)", (ids,)).fetchall()
            self._sink.clients_changed(clients, found)
        kids = list(dict.fromkeys(key for _, kind, key in rows if kind == feed.SIGNING_KEY))
        if kids:
            self._sink.keys_changed(kids)
        if rows:
            self._last = int(rows[-1][0])
        self._fresh_at = started

    def _reload(self, conn: Connection, started: float) -> None:
        top = conn.execute(feed.LAST_ID_SQL).fetchone()
        rows = conn.execute(self._clients_sql).fetchall()
        self._sink.reloaded(rows)
        kids = [row[0] for row in conn.execute(_KIDS_SQL).fetchall()]
        if kids:
            self._sink.keys_changed(kids)
        self.reloads += 1
        log.info("feed.reloaded", database=self._where, clients=len(rows))
        self._last = int(top[0]) if top else self._last
        self._fresh_at = started


def follow(db: PostgreSQLDatabase, sink: FeedSink, *, last: int, clients_sql: str) -> FeedListener:
    """A started listener for `db`'s feed after change `last`."""
    listener = FeedListener(db, sink, last=last, clients_sql=clients_sql)
    listener.start()
    return listener


__all__ = ["FeedListener", "FeedSink", "follow"]
