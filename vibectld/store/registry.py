"""The client registry: one row per issued secret, kept in SQLite and mirrored in memory.

The database is the record and memory is a cache of it: a change (issue, revoke, update,
an audit row) is committed (WAL, synchronous=FULL) before memory changes and before the
caller hears of it, so an acknowledged change survives a crash. Reads on the request path
never touch the disk. Usage (`record_call`: the client's request count and last-seen time,
and the per-day usage table) is the one exception to write-first: it changes memory at
once and reaches the disk in batches (`flush`, and `close`), since losing a few seconds of
counts in a crash is cheap and a write per request is not. A failed flush keeps its counts
for the next one.

Two locks: `_lock` guards memory and is only ever held briefly (the request path takes
it); `_db_lock` serialises everything that uses the connection, so a flush's disk write
never blocks the request path. When both are needed, `_db_lock` is taken first.

The registry holds a secret's metadata only, never the secret.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from vibectl.util.timefmt import readable
from vibectld.store import audit, spend, usage
from vibectld.store.audit import AuditEntry
from vibectld.store.migrations import MIGRATIONS, SCHEMA_VERSION, _prepare_file, migrate
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
)
from vibectld.store.usage import UsageRow

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
    "Registry",
    "RegistryError",
    "StorageFailure",
    "Unset",
    "UsageRow",
    "migrate",
]


_NEVER = 2**63


class Registry:
    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        records: dict[str, ClientRecord],
        book: usage.UsageBook | None = None,
        spent: spend.SpendBook | None = None,
    ):
        self._db: sqlite3.Connection | None = db
        self._path = path
        self._records = records
        # Names never change and records are never deleted, so this index only grows.
        self._ids_by_name: dict[str, list[str]] = {}
        for record in records.values():
            self._ids_by_name.setdefault(record.name, []).append(record.id)
        self._usage = book if book is not None else usage.UsageBook()
        self._spend = spent if spent is not None else spend.SpendBook()
        self._pending: set[str] = set()  # clients whose counters are not yet on disk
        # (valid from, valid until, counts): the heartbeat asks every few seconds, and a
        # scan of 100,000 records costs ~15 ms of the loop; a change of any status drops it.
        self._counts: tuple[int, int, dict[str, int]] | None = None
        self._lock = threading.Lock()  # memory; held briefly
        self._db_lock = threading.Lock()  # the connection; taken before _lock

    def __repr__(self) -> str:
        return f"Registry(path={str(self._path)!r}, clients={len(self._records)})"

    @classmethod
    def open(cls, path: Path, *, now: int | None = None) -> Registry:
        """Open (creating and migrating if needed) the database and load every record.

        Today's usage (the UTC day of `now`) is loaded too, so `tokens_used` counts what
        was spent before a restart.
        """
        now = _now(now)
        try:
            _prepare_file(path)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StorageFailure(f"cannot open the client registry {path}: {e}") from None
        book = usage.UsageBook()
        spent = spend.SpendBook()
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageFailure(
                    f"{path}: SQLite refused WAL mode (got {mode!r}); keep the state "
                    "directory on a local filesystem"
                )
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA busy_timeout = 5000")
            migrate(db, path)
            rows = db.execute(f"SELECT {_COLUMNS} FROM clients").fetchall()  # noqa: S608
            book.load(db.execute(usage.LOAD_DAY_SQL, (usage.day_of(now),)).fetchall(), now)
            # The month's dollars per client and the day's for the server: the budgets.
            spent.load(
                db.execute(spend.MONTH_SQL, spend.month_days(now)).fetchall(),
                db.execute(spend.DAY_SQL, (usage.day_of(now),)).fetchone()[0],
                now,
            )
        except sqlite3.DatabaseError as e:
            db.close()
            raise StorageFailure(
                f"the client registry {path} is unreadable ({e}); restore it from a backup"
            ) from None
        except BaseException:
            db.close()
            raise
        records = {row[0]: _record(row) for row in rows}
        return cls(db, path, records, book, spent)

    def close(self) -> None:
        """Write pending usage counts and close the database; later calls do nothing."""
        with self._db_lock:
            if self._db is None:
                return
            try:
                self._flush_locked()
            finally:
                self._db.close()
                self._db = None

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
        with self._db_lock:
            for other in self._named(name):
                if other.status(now) == "active":
                    raise DuplicateClient(
                        f"an active client named {name!r} exists (id {other.id}); revoke it "
                        "first or choose another name"
                    )
            self._transaction(
                (
                    f"INSERT INTO clients ({_COLUMNS}) "  # noqa: S608
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_db_row(record)],
                )
            )
            with self._lock:
                self._records[record.id] = record
                self._ids_by_name.setdefault(record.name, []).append(record.id)
                self._counts = None
        return record

    def _named(self, name: str) -> list[ClientRecord]:
        return [self._records[i] for i in self._ids_by_name.get(name, ())]

    def get(self, jti: str) -> ClientRecord | None:
        """The record for a secret's jti; memory only, for the request path."""
        return self._records.get(jti)

    def find(self, name_or_id: str, now: int | None = None) -> ClientRecord:
        """By exact id; else by name, preferring the active client, else the newest."""
        now = _now(now)
        record = self._records.get(name_or_id)
        if record is not None:
            return record
        named = self._named(name_or_id)
        if not named:
            raise ClientNotFound(f"no client named or with id {_quote(name_or_id)}; {_LIST_HINT}")
        return max(named, key=lambda r: (r.status(now) == "active", r.created_at, r.id))

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
            record = self.find(name_or_id, now)
            if record.revoked_at is not None:
                raise AlreadyRevoked(
                    f"client {record.name!r} (id {record.id}) was already revoked by "
                    f"{record.revoked_by} at {readable(record.revoked_at)}; {_LIST_HINT}"
                )
            self._transaction(
                (
                    "UPDATE clients SET revoked_at = ?, revoked_by = ?, revoke_reason = ? "
                    "WHERE id = ?",
                    [(now, by, reason, record.id)],
                )
            )
            with self._lock:
                # Re-read under the lock: a counted call may have replaced the record.
                current = self._records[record.id]
                revoked = replace(current, revoked_at=now, revoked_by=by, revoke_reason=reason)
                self._records[record.id] = revoked
                self._counts = None
        return revoked

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
        changes: dict[str, Any] = {}
        if models is not UNSET:
            changes["models"] = _check_models(models)
        for label, value in (
            ("rpm", rpm),
            ("concurrency", concurrency),
            ("tokens_per_day", tokens_per_day),
        ):
            if value is not UNSET:
                changes[label] = _check_limit(label, value)
        if usd_per_month is not UNSET:
            changes["usd_per_month"] = _check_usd("usd_per_month", usd_per_month)
        if note is not UNSET:
            changes["note"] = _check_note(note)
        with self._db_lock:
            record = self.find(name_or_id, now)
            if record.revoked_at is not None:
                raise AlreadyRevoked(f"client {record.name!r} is revoked; issue a new one")
            if record.expires_at <= now:
                raise AlreadyRevoked(
                    f"client {record.name!r} expired at {readable(record.expires_at)}; "
                    "issue a new one"
                )
            if not changes:
                return record
            new = replace(record, **changes)
            self._transaction(
                (
                    "UPDATE clients SET note = ?, models = ?, rpm = ?, concurrency = ?, "
                    "tokens_per_day = ?, usd_per_month = ?, updated_at = ?, updated_by = ? "
                    "WHERE id = ?",
                    [
                        (
                            new.note,
                            _models_json(new.models),
                            new.rpm,
                            new.concurrency,
                            new.tokens_per_day,
                            new.usd_per_month,
                            now,
                            by,
                            record.id,
                        )
                    ],
                )
            )
            with self._lock:
                updated = replace(self._records[record.id], **changes)
                self._records[record.id] = updated
                self._counts = None
        return updated

    def clients(
        self, *, include_inactive: bool = False, now: int | None = None
    ) -> list[ClientRecord]:
        now = _now(now)
        records = sorted(self._records.values(), key=lambda r: (r.created_at, r.id))
        if include_inactive:
            return records
        return [r for r in records if r.status(now) == "active"]

    def counts(self, now: int | None = None) -> dict[str, int]:
        now = _now(now)
        cached = self._counts
        if cached is not None and cached[0] <= now < cached[1]:
            return dict(cached[2])
        counts = {"active": 0, "expired": 0, "revoked": 0}
        next_expiry = _NEVER
        with self._lock:
            for record in self._records.values():
                status = record.status(now)
                counts[status] += 1
                if status == "active":
                    next_expiry = min(next_expiry, record.expires_at)
            # Unchanged until the next active client expires, or a write drops it.
            self._counts = (now, next_expiry, counts)
        return dict(counts)

    def active_by_kid(self, now: int | None = None) -> dict[str | None, int]:
        """How many active clients each signing key signed; None counts the unknown ones."""
        now = _now(now)
        counts: dict[str | None, int] = {}
        with self._lock:
            for record in self._records.values():
                if record.status(now) == "active":
                    counts[record.kid] = counts.get(record.kid, 0) + 1
        return counts

    def active_signed_by(self, kid: str, now: int | None = None) -> list[ClientRecord]:
        """The active clients whose secrets `kid` signed."""
        now = _now(now)
        with self._lock:
            records = list(self._records.values())
        return [r for r in records if r.kid == kid and r.status(now) == "active"]

    # -- usage: memory at once, the database at the next flush ------------------------

    def record_call(
        self,
        client_id: str,
        *,
        now: int,
        error: bool,
        input_tokens: int | None,
        output_tokens: int | None,
        cost_usd: float | None,
    ) -> None:
        """Count a served call (failed or not) for its client and UTC day; no SQL.

        Adds one to the client's `requests` and moves `last_seen_at`, and adds the call to
        the day's usage. Unknown ids are ignored; missing, negative or non-finite token
        counts and costs count as 0.
        """
        call = usage.call_counts(error, input_tokens, output_tokens, cost_usd)
        with self._lock:
            record = self._records.get(client_id)
            if record is None:
                return
            self._records[client_id] = replace(
                record,
                requests=record.requests + 1,
                last_seen_at=max(now, record.last_seen_at or 0),
            )
            self._pending.add(client_id)
            self._usage.record(client_id, now, call)
            self._spend.record(client_id, now, call.cost_usd)

    def record_redactions(self, client_id: str, *, now: int, found: dict[str, int]) -> None:
        """Count the secrets the server found in a call's prompt, per kind; no SQL.

        Counted whether the call was then served (redacted) or refused, so it is not a
        request of its own; unknown ids are ignored.
        """
        with self._lock:
            if client_id in self._records:
                self._usage.record_redactions(client_id, now, found)

    def usd_spent_month(self, client_id: str, now: float) -> float:
        """Dollars the client spent in the UTC calendar month of `now`, from memory."""
        with self._lock:
            return self._spend.month_spent(client_id, now)

    def usd_spent_day(self, now: float) -> float:
        """Dollars every client together spent on the UTC day of `now`, from memory."""
        with self._lock:
            return self._spend.day_spent(now)

    def tokens_used(self, client_id: str, now: int) -> int:
        """Input plus output tokens of the client's UTC day of `now`, from memory."""
        with self._lock:
            return self._usage.tokens_used(client_id, now)

    def top_today(self, now: int, limit: int = 5) -> list[UsageRow]:
        """The `limit` clients with the most usage on the UTC day of `now`, from memory."""
        with self._lock:
            totals = self._usage.day_totals(now)
            rows = [counts.row(cid, self._name(cid)) for cid, counts in totals]
        return usage.sort_rows(rows)[: max(limit, 0)]

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
                ids = sorted(r.id for r in self._named(name_or_id))
            ids = ids or [chosen.id]
        n_ids = len(ids) if chosen is not None else None
        with self._db_lock:
            self._flush_locked()
            found = self._query(usage.select_totals_sql(n_ids), [since_day, *ids])
            secrets = self._query(usage.select_redactions_sql(n_ids), [since_day, *ids])
        counts = {row[0]: usage.Counts(*row[1:]) for row in found}
        kinds: dict[str, dict[str, int]] = {}
        for client_id, kind, n in secrets:
            kinds.setdefault(client_id, {})[kind] = n
            # A client whose every call was refused for its secrets has no other usage.
            counts.setdefault(client_id, usage.Counts())
        if chosen is not None:
            counts.setdefault(chosen.id, usage.Counts())
        return usage.sort_rows(
            c.row(cid, self._name(cid), kinds.get(cid)) for cid, c in counts.items()
        )

    def flush(self) -> None:
        """Write the usage and counters counted since the last flush, in one transaction.

        On failure (RegistryError) nothing is lost: the counts stay for the next flush.
        """
        with self._db_lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        with self._lock:
            if not self._pending and not self._usage.dirty:
                return
            pending, self._pending = self._pending, set()
            # Memory holds the clients' totals, so writing them is idempotent; usage is
            # written as increments, which are handed over here and put back on failure.
            counters = [
                (self._records[jti].requests, self._records[jti].last_seen_at, jti)
                for jti in pending
            ]
            deltas = self._usage.take_deltas()
            redactions = self._usage.take_redactions()
        try:
            self._transaction(
                ("UPDATE clients SET requests = ?, last_seen_at = ? WHERE id = ?", counters),
                (usage.UPSERT_SQL, usage.delta_rows(deltas)),
                (usage.REDACTIONS_UPSERT_SQL, usage.redaction_rows(redactions)),
            )
        except BaseException:
            with self._lock:
                self._pending |= pending
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
            self._transaction((audit.INSERT_SQL, [row]))

    def audit(self, *, since: int, limit: int = 1000) -> list[AuditEntry]:
        """The newest `limit` audit rows at or after `since` (unix time), oldest first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRecord("limit must be a whole number of at least 1")
        with self._db_lock:
            rows = self._query(audit.SELECT_SQL, (since, limit))
        return [audit.entry(row) for row in reversed(rows)]

    # -- the connection -----------------------------------------------------------------

    def _name(self, client_id: str) -> str:
        record = self._records.get(client_id)
        return record.name if record is not None else client_id

    def _transaction(self, *steps: tuple[str, Sequence[Sequence[Any]]]) -> None:
        """Run each (sql, rows) in one committed transaction, or raise RegistryError."""
        if self._db is None:
            raise StorageFailure("the client registry is closed")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in steps:
                    if rows:
                        self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StorageFailure(
                f"cannot write the client registry {self._path}: {e}; check the disk "
                "space and the state directory's permissions"
            ) from None

    def _query(self, sql: str, params: Sequence[Any]) -> list[Any]:
        if self._db is None:
            raise StorageFailure("the client registry is closed")
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise StorageFailure(f"cannot read the client registry {self._path}: {e}") from None
