"""The client registry: the Store (base.py) as a memory mirror over a SQL Database.

The database is the record and memory is a cache of it: a change (issue, revoke, update,
an audit row) is committed durably before memory changes and before the caller hears of
it, so an acknowledged change survives a crash. Reads on the request path never wait on
the database. Usage (`record_call`: the client's request count and last-seen time, and
the per-day usage table) is the one exception to write-first: it changes memory at once
and reaches the database in batches (`flush`, and `close`), as increments, since losing
a few seconds of counts in a crash is cheap and a write per request is not. A failed
flush keeps its counts for the next one. That half, and the locks, are writethrough.py.
With a usage journal (journal.py; the daemon always gives one), each counted call is also
appended to a file at once, and `load` replays what a killed run left there, so a crash
loses only the calls in flight.

Writes decide on the database's state, not memory's: issue checks the name's rows under
a lock, revoke and update are conditional UPDATEs. With several nodes on one database
(PostgreSQL), each client write also records a change in the feed (feed.py), in its own
transaction; every node's listener (listener.py) brings it into memory within
milliseconds and tells the `on_change` callbacks, and `freshness` says how old that
view is. A write that meets a change the feed has not brought yet takes the fresh row
in likewise.

The registry holds a secret's metadata only, never the secret.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vibectl.util.timefmt import readable
from vibectld.store import feed, spend, usage
from vibectld.store.audit import AuditEntry
from vibectld.store.base import (
    Database,
    NodeInfo,
    StoreHealth,
    Transaction,
)
from vibectld.store.journal import UsageJournal
from vibectld.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from vibectld.store.records import (
    _COLUMNS,
    _LIST_HINT,
    _NAME,
    MAX_LIMIT,
    NAME_RULE,
    UNSET,
    AlreadyRevoked,
    ClientNotFound,
    ClientRecord,
    DuplicateClient,
    InvalidRecord,
    RegistryError,
    StorageFailure,
    Unset,
    _check_limit,
    _check_models,
    _check_note,
    _check_usd,
    _db_row,
    _models_json,
    _now,
    _quote,
    _record,
    check_changes,
)
from vibectld.store.sqlite import SQLiteDatabase
from vibectld.store.usage import UsageRow
from vibectld.store.writethrough import WriteThrough, replay_journal

if TYPE_CHECKING:  # psycopg is imported only by a daemon on PostgreSQL
    from vibectld.store.listener import FeedListener

__all__ = [
    "MAX_LIMIT",
    "MIGRATIONS",
    "NAME_RULE",
    "SCHEMA_VERSION",
    "UNSET",
    "AlreadyRevoked",
    "AuditEntry",
    "ClientNotFound",
    "ClientRecord",
    "DuplicateClient",
    "InvalidRecord",
    "NodeInfo",
    "Registry",
    "RegistryError",
    "StorageFailure",
    "StoreHealth",
    "Unset",
    "UsageRow",
    "migrate",
]

T = TypeVar("T")

_SELECT = f"SELECT {_COLUMNS} FROM clients"  # noqa: S608
_INSERT = f"INSERT INTO clients ({_COLUMNS}) VALUES ({', '.join('?' * 17)})"  # noqa: S608
_NODE_UPSERT_SQL = (
    "INSERT INTO nodes (name, address, version, in_flight, started_at, heartbeat_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET address = excluded.address, "
    "version = excluded.version, in_flight = excluded.in_flight, "
    "started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at"
)
_NODES_SQL = (
    "SELECT name, address, version, in_flight, started_at, heartbeat_at FROM nodes ORDER BY name"
)
# A node silent for a day is gone (or renamed): `status` stops listing it.
_NODES_PRUNE_SQL = "DELETE FROM nodes WHERE heartbeat_at < ?"
NODE_RETENTION_SECONDS = 86400
PRUNE_FEED_EVERY_SECONDS = 600  # the change feed's old rows, from the heartbeat
_RELOAD_SLICE = 1000  # client rows compared per hold of the memory lock
# The fields `update` may change, in the order of its keyword arguments.
_UPDATABLE = ("models", "rpm", "concurrency", "tokens_per_day", "usd_per_month", "note")


class Registry(WriteThrough):
    """The Store (base.py): the memory mirror, written through a Database."""

    def __init__(
        self,
        db: Database,
        records: dict[str, ClientRecord],
        book: usage.UsageBook | None = None,
        spent: spend.SpendBook | None = None,
    ):
        # WriteThrough's parameters, restated rather than passed as *args so that a
        # caller's arguments stay type-checked.
        super().__init__(db, records, book, spent)
        self._fresh_at = time.time()  # when memory last read every client from the database
        self._nodes: list[NodeInfo] = []
        # The shared database's change feed (load starts it), and the ids of the changes
        # this node wrote, which the feed brings back: taken in, but not announced to the
        # on_change callbacks (the writer's caller acts on its own change).
        self._listener: FeedListener | None = None
        self._own_changes: set[int] = set()
        self._tx_changes: list[int] = []  # recorded by the transaction running (_db_lock)
        self._feed_pruned_at: float | None = None  # time.monotonic()

    def __repr__(self) -> str:
        return f"Registry(db={self._db!r}, clients={len(self._records)})"

    @classmethod
    def open(cls, path: Path, *, now: int | None = None, journal: Path | None = None) -> Registry:
        """The SQLite registry at `path` (created and migrated if needed), loaded."""
        return cls.load(SQLiteDatabase.open(path), now=now, journal=journal)

    @classmethod
    def open_postgresql(
        cls, dsn: str, *, now: int | None = None, journal: Path | None = None
    ) -> Registry:
        """The PostgreSQL registry of the libpq string `dsn` (schema created if needed)."""
        # psycopg takes ~0.3 s to import: only a daemon that uses it pays for it.
        from vibectld.store.postgresql import PostgreSQLDatabase

        return cls.load(PostgreSQLDatabase.open(dsn), now=now, journal=journal)

    @classmethod
    def load(cls, db: Database, *, now: int | None = None, journal: Path | None = None) -> Registry:
        """Load every record, and the usage and spend of the day and month of `now`, so
        that `tokens_used` and the budgets count what was spent before a restart.
        `db` belongs to the registry from here on (closed with it, or on failure).

        With `journal` (a directory: journal.py), the usage a killed run left there is
        written to the database first, and every call counted from here on goes there too.
        """
        now = _now(now)
        today = (usage.day_of(now),)
        opened: UsageJournal | None = None
        try:
            if journal is not None:
                opened = UsageJournal.open(journal)
                replay_journal(db, opened)
            # The feed's position first: a change committed while the clients are read is
            # then delivered again (harmless), never missed.
            last = int(db.query(feed.LAST_ID_SQL)[0][0]) if db.shared else 0
            rows = db.query(_SELECT)
            book = usage.UsageBook()
            book.load(db.query(usage.LOAD_DAY_SQL, today), now)
            spent = spend.SpendBook()
            # The month's dollars per client and the day's for the server: the budgets.
            day_total = db.query(spend.DAY_SQL, today)[0][0]
            spent.load(db.query(spend.MONTH_SQL, spend.month_days(now)), day_total, now)
        except BaseException:
            if opened is not None:
                opened.close()
            db.close()
            raise
        registry = cls(db, {row[0]: _record(row) for row in rows}, book, spent)
        registry._journal = opened
        if db.shared:
            registry._follow_feed(last)
        return registry

    def _follow_feed(self, last: int) -> None:
        """Start the listener of a shared database's change feed after change `last`."""
        from vibectld.store.listener import FeedSink, follow
        from vibectld.store.postgresql import PostgreSQLDatabase

        db = self._db
        if not isinstance(db, PostgreSQLDatabase):
            raise TypeError(f"no change feed to follow on {db!r}")
        sink = FeedSink(self._feed_clients, self._notify_keys, self._feed_reloaded)
        self._listener = follow(db, sink, last=last, clients_sql=_SELECT)

    def close(self) -> None:
        """Write pending usage counts and close the database; later calls do nothing."""
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.stop()
        with self._db_lock:
            if self._db is None:
                return
            try:
                self._flush_locked()
            finally:
                self._db.close()
                self._db = None
                # A failed last flush leaves its segments for the next start to replay.
                # Under the memory lock: a late record_call must not write to a closed
                # (perhaps reused) descriptor.
                if self._journal is not None:
                    with self._lock:
                        self._journal.close()

    # -- clients --------------------------------------------------------------------------
    # The signatures below restate Store's (store/base.py) on purpose: mypy checks the
    # Registry against that Protocol wherever a Store is expected.

    def issue(
        self,
        *,
        name: str,
        expires_at: int,
        issued_by: str,
        note: str | None = None,
        models: Sequence[str] | None = None,
        rpm: int | None = None,
        concurrency: int | None = None,
        tokens_per_day: int | None = None,
        kid: str | None = None,
        usd_per_month: float | None = None,
        now: int | None = None,
    ) -> ClientRecord:
        """Record a new client; its id is the jti to put in the secret, signed by `kid`."""
        now = _now(now)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InvalidRecord(f"invalid client name {_quote(str(name))}: {NAME_RULE}")
        if expires_at <= now:
            raise InvalidRecord("the expiry must lie in the future")
        record = ClientRecord(
            id=secrets.token_hex(16),
            name=name,
            created_at=now,
            expires_at=expires_at,
            issued_by=issued_by,
            note=_check_note(note),
            models=_check_models(models),
            rpm=_check_limit("rpm", rpm),
            concurrency=_check_limit("concurrency", concurrency),
            tokens_per_day=_check_limit("tokens_per_day", tokens_per_day),
            kid=kid,
            usd_per_month=_check_usd("usd_per_month", usd_per_month),
        )

        def insert_unless_active(tx: Transaction) -> list[ClientRecord]:
            # Every node issuing this name takes turns here, and decides on the rows.
            tx.lock(f"client name {name}")
            named = [_record(row) for row in tx.select(f"{_SELECT} WHERE name = ?", (name,))]
            if not any(r.status(now) == "active" for r in named):
                tx.execute(_INSERT, _db_row(record))
                self._record_change(tx, record.id, now)
            return named

        with self._db_lock:
            named = self._transaction(insert_unless_active)
            self._notify(self._learn(named))
            for other in named:
                if other.status(now) == "active":
                    raise DuplicateClient(
                        f"an active client named {name!r} exists (id {other.id}); revoke it "
                        "first or choose another name"
                    )
            with self._lock:
                self._keep(record)
        return record

    def revoke(
        self,
        name_or_id: str,
        *,
        by: str,
        reason: str | None = None,
        now: int | None = None,
    ) -> ClientRecord:
        now = _now(now)
        with self._db_lock:
            record = self._find_for_write(name_or_id, now)
            if record.revoked_at is None:
                sql = (
                    "UPDATE clients SET revoked_at = ?, revoked_by = ?, revoke_reason = ? "
                    "WHERE id = ? AND revoked_at IS NULL"
                )
                record, written = self._write_row(record.id, sql, (now, by, reason, record.id), now)
                if written:
                    return record
            raise AlreadyRevoked(
                f"client {record.name!r} (id {record.id}) was already revoked by "
                f"{record.revoked_by} at {readable(record.revoked_at or 0)}; {_LIST_HINT}"
            )

    def update(
        self,
        name_or_id: str,
        *,
        by: str,
        models: Sequence[str] | object | None = UNSET,
        rpm: int | object | None = UNSET,
        concurrency: int | object | None = UNSET,
        tokens_per_day: int | object | None = UNSET,
        usd_per_month: float | object | None = UNSET,
        note: str | object | None = UNSET,
        now: int | None = None,
    ) -> ClientRecord:
        """Change an active client's limits, models or note; effective on its next request.

        UNSET leaves a field alone; None clears an override (back to the server's default
        limit, or every model the server allows) or the note. Values are checked as for
        `issue`. A revoked or expired client is refused with AlreadyRevoked.
        """
        now = _now(now)
        given = (models, rpm, concurrency, tokens_per_day, usd_per_month, note)
        changes = check_changes(dict(zip(_UPDATABLE, given, strict=True)))
        with self._db_lock:
            record = self._find_for_write(name_or_id, now)
            if record.revoked_at is None and record.expires_at > now and changes:
                columns = [*changes, "updated_at", "updated_by"]
                values = [
                    *(_models_json(v) if k == "models" else v for k, v in changes.items()),
                    now,
                    by,
                ]
                sql = (
                    f"UPDATE clients SET {', '.join(f'{c} = ?' for c in columns)} "  # noqa: S608
                    "WHERE id = ? AND revoked_at IS NULL"
                )
                record, written = self._write_row(record.id, sql, (*values, record.id), now)
                if written:
                    return record
            if record.revoked_at is not None:
                raise AlreadyRevoked(f"client {record.name!r} is revoked; issue a new one")
            if record.expires_at <= now:
                raise AlreadyRevoked(
                    f"client {record.name!r} expired at {readable(record.expires_at)}; "
                    "issue a new one"
                )
        return record  # nothing to change

    def _find_for_write(self, name_or_id: str, now: int) -> ClientRecord:
        """`find`, after taking the database's rows of that id or name into memory when
        other nodes write it too (one of them may have issued or revoked it)."""
        if self._shared:
            rows = self._query(f"{_SELECT} WHERE id = ? OR name = ?", (name_or_id, name_or_id))
            self._notify(self._learn(_record(row) for row in rows))
        return self.find(name_or_id, now)

    def _write_row(
        self, jti: str, sql: str, params: Sequence[Any], now: int
    ) -> tuple[ClientRecord, bool]:
        """Run one conditional UPDATE of a client's row and take the row it left into
        memory; whether it changed the row. If not, another node changed the row first
        (the callbacks hear of it)."""

        def write(tx: Transaction) -> tuple[int, list[tuple[Any, ...]]]:
            changed = tx.execute(sql, params)
            if changed:
                self._record_change(tx, jti, now)
            return changed, tx.select(f"{_SELECT} WHERE id = ?", (jti,))

        changed, rows = self._transaction(write)
        if not rows:
            raise ClientNotFound(f"no client with id {_quote(jti)}; {_LIST_HINT}")
        fresh = _record(rows[0])
        if changed:
            with self._lock:
                return self._keep(self._merge(fresh)), True
        self._notify(self._learn([fresh]))
        return self._records[jti], False

    # -- several nodes --------------------------------------------------------------------

    def feed_listener(self) -> FeedListener | None:
        """The change feed's listener while it runs (a shared database only): the
        metrics read its counts (ops/metrics.py, watch_feed)."""
        return self._listener

    def usage_journal(self) -> UsageJournal | None:
        """The usage journal: a main process with workers tags their lines in it
        (workers/journal_files.py)."""
        return self._journal

    def freshness(self, now: float | None = None) -> float | None:
        if not self._shared:
            return None  # nothing but this process writes the database
        listener = self._listener
        fresh_at = listener.fresh_at if listener is not None else self._fresh_at
        return max(0.0, (time.time() if now is None else now) - fresh_at)

    def heartbeat(self, node: NodeInfo) -> None:
        """Also, on a shared database, forget nodes silent for NODE_RETENTION_SECONDS and
        (every PRUNE_FEED_EVERY_SECONDS) the change feed's rows older than its retention."""
        if not self._shared:
            with self._lock:
                self._nodes = [node]
            return
        pruned_at = self._feed_pruned_at
        prune_feed = pruned_at is None or time.monotonic() - pruned_at > PRUNE_FEED_EVERY_SECONDS

        def beat(tx: Transaction) -> list[tuple[Any, ...]]:
            tx.execute(_NODE_UPSERT_SQL, astuple(node))
            tx.execute(_NODES_PRUNE_SQL, (node.heartbeat_at - NODE_RETENTION_SECONDS,))
            if prune_feed:
                feed.prune(tx, node.heartbeat_at)
            return tx.select(_NODES_SQL)

        with self._db_lock:
            rows = self._transaction(beat)
            if prune_feed:
                self._feed_pruned_at = time.monotonic()
        with self._lock:
            self._nodes = [NodeInfo(*row) for row in rows]

    def nodes(self) -> list[NodeInfo]:
        with self._lock:
            return list(self._nodes)

    # -- the change feed ----------------------------------------------------------------

    def _record_change(self, tx: Transaction, client_id: str, now: int) -> None:
        """In a client write's transaction on a shared database: the row other nodes'
        feed listeners follow (feed.py). Its id is this node's own (see _feed_clients)."""
        if self._shared:
            change = feed.record_change(tx, feed.CLIENT, client_id, now)
            self._tx_changes.append(change)
            with self._lock:
                self._own_changes.add(change)

    def _feed_clients(
        self, changes: Sequence[tuple[int, str]], rows: list[tuple[Any, ...]]
    ) -> None:
        """The listener's delivery: take the rows in; tell the callbacks of the clients
        another node changed. This node's own changes are taken in silently (normally
        memory has them already; if the commit's reply was lost, it has them now)."""
        theirs = set()
        with self._lock:
            for change, client_id in changes:
                if change in self._own_changes:
                    self._own_changes.discard(change)
                else:
                    theirs.add(client_id)
        learned = self._learn(_record(row) for row in rows)
        self._notify([record for record in learned if record.id in theirs])

    def _feed_reloaded(self, rows: list[tuple[Any, ...]]) -> None:
        """Every client again, after a gap in the feed: each one memory had otherwise
        (another node's change, or one of ours whose reply was lost) is announced.
        In slices, so that the request path never waits on the memory lock for more
        than one slice's comparisons (100,000 clients would hold it ~0.3 s)."""
        for start in range(0, len(rows), _RELOAD_SLICE):
            slice_ = rows[start : start + _RELOAD_SLICE]
            self._notify(self._learn(_record(row) for row in slice_))

    def _transaction(self, work: Callable[[Transaction], T]) -> T:
        """As WriteThrough's, keeping count of the feed rows the transaction records."""
        self._tx_changes = []
        try:
            return super()._transaction(work)
        except BaseException:
            # Perhaps committed all the same (a reply lost with the connection): then the
            # feed brings these changes back, and the callbacks must hear of them, since
            # the writer's caller heard only of a failure.
            with self._lock:
                self._own_changes.difference_update(self._tx_changes)
            raise
