"""The client registry: the Store (base.py) as a memory mirror over a SQL Database.

The database is the record and memory is a cache of it: a change (issue, revoke, update,
an audit row) is committed durably before memory changes and before the caller hears of
it, so an acknowledged change survives a crash. Reads on the request path never wait on
the database. Usage (`record_call`: the client's request count and last-seen time, and
the per-day usage table) is the one exception to write-first: it changes memory at once
and reaches the database in batches (`flush`, and `close`), as increments, since losing
a few seconds of counts in a crash is cheap and a write per request is not. A failed
flush keeps its counts for the next one.

Writes decide on the database's state, not memory's: issue checks the name's rows under
a lock, revoke and update are conditional UPDATEs. With several nodes on one database
(PostgreSQL), memory can be behind another node's change; a write that meets such a
change takes the fresh row into memory and tells the `on_change` callbacks. (The change
feed that brings every such change without a write is the next step; `freshness` says
how old the view is meanwhile.)

Two locks: `_lock` guards memory and is only ever held briefly (the request path takes
it); `_db_lock` serialises everything that uses the database, so a flush's write never
blocks the request path. When both are needed, `_db_lock` is taken first.

The registry holds a secret's metadata only, never the secret.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import astuple, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from vibectl.util.timefmt import readable
from vibectld.store import audit, feed, spend, usage
from vibectld.store.audit import AuditEntry
from vibectld.store.base import (
    Database,
    NodeInfo,
    StoreHealth,
    Transaction,
)
from vibectld.store.migrations import MIGRATIONS, SCHEMA_VERSION, migrate
from vibectld.store.mirror import Mirror
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
# This node's counted calls, as increments (other nodes add theirs), and the latest call.
_COUNTERS_SQL = (
    "UPDATE clients SET requests = requests + ?, last_seen_at = CASE WHEN last_seen_at "
    "IS NULL OR last_seen_at < ? THEN ? ELSE last_seen_at END WHERE id = ?"
)
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
# The month's dollars before today change only by other nodes' late flushes around
# midnight: read again on a new day and this often, not at every flush.
MONTH_BASE_SECONDS = 300.0
# The fields `update` may change, in the order of its keyword arguments.
_UPDATABLE = ("models", "rpm", "concurrency", "tokens_per_day", "usd_per_month", "note")


class Registry(Mirror):
    """The Store (base.py): the memory mirror, written through a Database."""

    def __init__(
        self,
        db: Database,
        records: dict[str, ClientRecord],
        book: usage.UsageBook | None = None,
        spent: spend.SpendBook | None = None,
    ):
        super().__init__(records, book, spent)
        self._db: Database | None = db
        self._backend = db.backend
        self._shared = db.shared
        self._fresh_at = time.time()  # when memory last read every client from the database
        self._nodes: list[NodeInfo] = []
        self._health = StoreHealth(degraded=False)
        self._db_lock = threading.Lock()  # the database; taken before _lock
        # The shared database's change feed (load starts it), and the ids of the changes
        # this node wrote, which the feed brings back: taken in, but not announced to the
        # on_change callbacks (the writer's caller acts on its own change).
        self._listener: FeedListener | None = None
        self._own_changes: set[int] = set()
        self._tx_changes: list[int] = []  # recorded by the transaction running (_db_lock)
        self._feed_pruned_at: float | None = None  # time.monotonic()
        # (day number, time.monotonic() read, dollars per client in the month before it)
        self._month_base: tuple[int, float, dict[str, float]] | None = None

    def __repr__(self) -> str:
        return f"Registry(db={self._db!r}, clients={len(self._records)})"

    @classmethod
    def open(cls, path: Path, *, now: int | None = None) -> Registry:
        """The SQLite registry at `path` (created and migrated if needed), loaded."""
        return cls.load(SQLiteDatabase.open(path), now=now)

    @classmethod
    def open_postgresql(cls, dsn: str, *, now: int | None = None) -> Registry:
        """The PostgreSQL registry of the libpq string `dsn` (schema created if needed)."""
        # psycopg takes ~0.3 s to import: only a daemon that uses it pays for it.
        from vibectld.store.postgresql import PostgreSQLDatabase

        return cls.load(PostgreSQLDatabase.open(dsn), now=now)

    @classmethod
    def load(cls, db: Database, *, now: int | None = None) -> Registry:
        """Load every record, and the usage and spend of the day and month of `now`, so
        that `tokens_used` and the budgets count what was spent before a restart.
        `db` belongs to the registry from here on (closed with it, or on failure)."""
        now = _now(now)
        today = (usage.day_of(now),)
        try:
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
            db.close()
            raise
        registry = cls(db, {row[0]: _record(row) for row in rows}, book, spent)
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

    @property
    def backend(self) -> str:
        return self._backend

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

    # -- clients --------------------------------------------------------------------------

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

    # -- usage: memory at once, the database at the next flush ------------------------

    def usage(
        self, *, since_day: str, name_or_id: str | None = None, now: int | None = None
    ) -> list[UsageRow]:
        """Usage per client id summed over the UTC days >= `since_day` (YYYY-MM-DD).

        Counts not yet flushed are included (this flushes first). Without `name_or_id`:
        every client with usage in the span. With an id: that client. With a name: one
        row per client id that had that name and used the span, plus always the client
        `find` picks (so an unused active client shows as zeros) — a name reissued after
        a revocation thus gives the old and the new client a row each. Ordered by cost,
        then requests, most first.
        """
        try:
            usage.parse_day(since_day)
        except (TypeError, ValueError):
            raise InvalidRecord(
                f"since_day must be a date like 2025-01-31, not {_quote(str(since_day))}"
            ) from None
        chosen: ClientRecord | None = None
        ids: list[str] = []
        if name_or_id is not None:
            chosen = self.find(name_or_id, now)
            if chosen.id != name_or_id:  # a name: every client that had it
                ids = sorted(self._ids_by_name.get(name_or_id, ()))
            ids = ids or [chosen.id]
        n_ids = len(ids) if chosen is not None else None
        with self._db_lock:
            self._flush_locked()
            found = self._query(usage.select_totals_sql(n_ids), [since_day, *ids])
            kinds = self._query(usage.select_redactions_sql(n_ids), [since_day, *ids])
        rows = usage.rows_of(found, kinds, [chosen.id] if chosen is not None else [])
        return usage.sort_rows(replace(row, name=self._name(row.client_id)) for row in rows)

    def flush(self) -> None:
        """Write the usage and counters counted since the last flush, in one transaction.

        On failure (RegistryError) nothing is lost: the counts stay for the next flush.
        On a shared database, then read back the day's and the month's totals, which
        other nodes' flushes add to (`_take_totals`).
        """
        with self._db_lock:
            self._flush_locked()
            if self._shared:
                self._take_totals()

    def _take_totals(self) -> None:
        """Make the budgets' counts cluster-wide: memory = the database's totals (every
        node's flushed counts) + this node's counts not yet flushed. Under _db_lock.

        Two reads: the day's usage rows, by the day's index; the month's dollars before
        today only on a new day or every MONTH_BASE_SECONDS. So another node's calls
        count here at most one flush interval of theirs plus one of ours after they were
        served (2 s + 2 s with the daemon's flush loop).
        """
        now = time.time()
        with self._lock:
            # The newest day counted (a test's clock may run ahead of the wall's).
            day = max(self._usage.latest_day, usage.day_number(int(now)))
        rows = self._query(usage.LOAD_DAY_SQL, (usage.day_text(day),))
        base = self._month_base
        if base is None or base[0] != day or time.monotonic() - base[1] > MONTH_BASE_SECONDS:
            first, _ = spend.month_days(day * usage.DAY_SECONDS)
            found = self._query(spend.MONTH_SQL, (first, usage.day_text(day)))
            base = (day, time.monotonic(), {cid: float(total or 0.0) for cid, total in found})
            self._month_base = base
        with self._lock:
            self._usage.replace_day(rows, day)
            self._spend.replace(day, base[2], rows, self._usage.unwritten_costs())

    def _flush_locked(self) -> None:
        with self._lock:
            if not self._pending and not self._usage.dirty:
                return
            # Everything is written as increments (nodes sharing a database add up); what
            # is handed over here is put back if the write fails.
            pending, self._pending = self._pending, {}
            counters = []
            for jti, calls in pending.items():
                seen = self._records[jti].last_seen_at
                counters.append((calls, seen, seen, jti))
            deltas = self._usage.take_deltas()
            redactions = self._usage.take_redactions()
        try:
            self._transaction(
                _steps(
                    (_COUNTERS_SQL, counters),
                    (usage.UPSERT_SQL, usage.delta_rows(deltas)),
                    (usage.REDACTIONS_UPSERT_SQL, usage.redaction_rows(redactions)),
                )
            )
        except BaseException:
            with self._lock:
                for jti, calls in pending.items():
                    self._pending[jti] = self._pending.get(jti, 0) + calls
                self._usage.restore_deltas(deltas)
                self._usage.restore_redactions(redactions)
            raise
        with self._lock:
            self._usage.prune()

    # -- audit --------------------------------------------------------------------------

    def add_audit(
        self,
        *,
        at: int,
        caller_uid: int | None,
        caller_user: str,
        op: str,
        target: str | None,
        outcome: str,
        detail: str | None = None,
    ) -> None:
        """Commit an audit row at once; RegistryError (only) if the database fails.

        Pass names and ids, never secrets; secret-shaped text is redacted regardless.
        """
        row = audit.insert_row((at, caller_uid, caller_user, op, target, outcome, detail))
        with self._db_lock:
            self._transaction(_steps((audit.INSERT_SQL, [row])))

    def audit(self, *, since: int, limit: int = 1000) -> list[AuditEntry]:
        """The newest `limit` audit rows at or after `since` (unix time), oldest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRecord("limit must be a whole number of at least 1")
        with self._db_lock:
            rows = self._query(audit.SELECT_SQL, (since, limit))
        return [audit.entry(row) for row in reversed(rows)]

    # -- several nodes --------------------------------------------------------------------

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

    def health(self) -> StoreHealth:
        return self._health

    def transact(self, work: Callable[[Transaction], T]) -> T:
        """Run `work` in one committed transaction of this store's database; database.

        For state kept beside the clients (the cluster's CA and signing keys): the same
        connection, the same health accounting.
        """
        with self._db_lock:
            return self._transaction(work)

    @property
    def shared(self) -> bool:
        """Whether other nodes write this store's database (PostgreSQL); memory."""
        return self._shared

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
        (another node's change, or one of ours whose reply was lost) is announced."""
        self._notify(self._learn(_record(row) for row in rows))

    # -- the database: the only two ways in ---------------------------------------------

    def _transaction(self, work: Callable[[Transaction], T]) -> T:
        """Run `work` in one committed transaction (under _db_lock), or raise."""
        self._tx_changes = []
        try:
            return self._use(lambda db: db.transaction(work))
        except BaseException:
            # Perhaps committed all the same (a reply lost with the connection): then the
            # feed brings these changes back, and the callbacks must hear of them, since
            # the writer's caller heard only of a failure.
            with self._lock:
                self._own_changes.difference_update(self._tx_changes)
            raise

    def _query(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._use(lambda db: db.query(sql, params))

    def _use(self, op: Callable[[Database], T]) -> T:
        if self._db is None:
            raise StorageFailure("the client registry is closed")
        try:
            result = op(self._db)
        except StorageFailure as e:
            since = self._health.since if self._health.degraded else time.time()
            self._health = StoreHealth(degraded=True, reason=str(e), since=since)
            raise
        if self._health.degraded:
            self._health = StoreHealth(degraded=False)
        return result


def _steps(*steps: tuple[str, Sequence[Sequence[Any]]]) -> Callable[[Transaction], None]:
    """A transaction of (sql, rows) steps, each run once per row; empty ones skipped."""

    def run(tx: Transaction) -> None:
        for sql, rows in steps:
            if rows:
                tx.executemany(sql, rows)

    return run
