"""The memory mirror with the Database under it: the half of the Registry that is not
about clients' records.

The database's two ways in (`_transaction`, `_query`, under `_db_lock`) with the health
they keep; usage, which reaches the database in batches (`flush`) as increments, and on a
shared database comes back as every node's totals, with the usage journal (journal.py)
switched to a new segment by each flush and replayed at start (`replay_journal`); audit
rows, written at once. The Registry (registry.py) adds the clients' writes, the change
feed and the heartbeats.

Two locks: `_lock` (Mirror) guards memory and is only ever held briefly (the request
path takes it); `_db_lock` serialises everything that uses the database, so a flush's
write never blocks the request path. When both are needed, `_db_lock` is taken first.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import structlog

from vibectld.store import audit, spend, usage
from vibectld.store.audit import AuditEntry
from vibectld.store.base import Database, StoreHealth, Transaction
from vibectld.store.journal import APPLIED_SQL, UsageJournal
from vibectld.store.journal import MARK_SQL as JOURNAL_MARK_SQL
from vibectld.store.mirror import Mirror
from vibectld.store.records import ClientRecord, InvalidRecord, StorageFailure, _quote
from vibectld.store.usage import UsageRow

T = TypeVar("T")
log = structlog.get_logger("vibectld.store")

# This node's counted calls, as increments (other nodes add theirs), and the latest call.
_COUNTERS_SQL = (
    "UPDATE clients SET requests = requests + ?, last_seen_at = CASE WHEN last_seen_at "
    "IS NULL OR last_seen_at < ? THEN ? ELSE last_seen_at END WHERE id = ?"
)
# The month's dollars before today change only by other nodes' late flushes around
# midnight: read again on a new day and this often, not at every flush.
MONTH_BASE_SECONDS = 300.0


class WriteThrough(Mirror):
    """The mirror and its Database: usage, audit and the database's two ways in."""

    def __init__(
        self,
        db: Database,
        records: dict[str, ClientRecord],
        book: usage.UsageBook | None = None,
        spent: spend.SpendBook | None = None,
    ) -> None:
        super().__init__(records, book, spent)
        self._db: Database | None = db
        self._backend = db.backend
        self._shared = db.shared
        self._health = StoreHealth(degraded=False)
        self._db_lock = threading.Lock()  # the database; taken before _lock
        # (day number, time.monotonic() read, dollars per client in the month before it)
        self._month_base: tuple[int, float, dict[str, float]] | None = None

    @property
    def backend(self) -> str:
        return self._backend

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
        # Built outside the lock (O(clients)); swapped in under it (O(unflushed counts)).
        day_totals = usage.day_of_rows(rows)
        month, day_total = spend.sums(base[2], rows)
        with self._lock:
            old_day = self._usage.replace_day(day, day_totals)
            old_month = self._spend.replace(day, month, day_total, self._usage.unwritten_costs())
        del old_day, old_month  # freed here, not under the lock

    def _flush_locked(self) -> None:
        with self._lock:
            if not self._pending and not self._usage.dirty:
                return
            # Everything is written as increments (nodes sharing a database add up); what
            # is handed over here is put back if the write fails.
            pending, self._pending = self._pending, {}
            counters = {
                jti: (calls, self._records[jti].last_seen_at) for jti, calls in pending.items()
            }
            deltas = self._usage.take_deltas()
            redactions = self._usage.take_redactions()
            # The journal's segments up to here hold exactly what was just taken (and what
            # failed flushes put back): the write below records them as applied.
            journal = self._journal
            upto = journal.rotate() if journal is not None else None
            unwritten = journal.take_unwritten() if journal is not None else 0
        if unwritten:
            log.warning(
                "usage_journal.write_failed",
                calls=unwritten,
                directory=str(journal.directory) if journal is not None else None,
                hint="these calls' usage is lost if the node is killed before this flush "
                "commits; check free space and permissions in the state directory",
            )
        mark = (journal.identity, upto) if journal is not None and upto is not None else None
        try:
            self._transaction(usage_steps(counters, deltas, redactions, mark))
        except BaseException:
            with self._lock:
                for jti, calls in pending.items():
                    self._pending[jti] = self._pending.get(jti, 0) + calls
                self._usage.restore_deltas(deltas)
                self._usage.restore_redactions(redactions)
            raise
        if journal is not None and upto is not None:
            journal.discard(upto)
        with self._lock:
            self._usage.prune()

    # -- audit --------------------------------------------------------------------------
    # add_audit restates Store.add_audit's signature (store/base.py): mypy checks the
    # Registry, which inherits it, against that Protocol.

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

    # -- the database: the only two ways in ---------------------------------------------

    def _transaction(self, work: Callable[[Transaction], T]) -> T:
        """Run `work` in one committed transaction (under _db_lock), or raise."""
        return self._use(lambda db: db.transaction(work))

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


def replay_journal(db: Database, journal: UsageJournal) -> None:
    """Write what the journal's segments left by an earlier run hold, unless the database
    has it already (a crash after a flush's commit, before its deletion), and delete
    them; then start a new segment. One transaction, marking them applied.

    The same transaction counts the workers' lines that run never journalled (calls a
    worker answered while its main process was being killed: journal.py). They go with
    the newest segment, which a killed run always leaves unapplied: a crash after this
    commit and before the files' deletion leaves every segment applied, and the next
    start then only deletes the files, as it does a cleanly stopped run's."""
    found = db.query(APPLIED_SQL, (journal.identity,))
    applied = int(found[0][0]) if found else 0
    segments = journal.leftovers()
    workers = journal.worker_files()
    unapplied = [seq for seq in segments if seq > applied]
    if unapplied:
        left = journal.read(unapplied, workers, journal.journalled(segments))
        mark = (journal.identity, left.upto)
        db.transaction(usage_steps(left.counters, left.deltas, left.redactions, mark))
        log.info(
            "usage_journal.replayed",
            segments=len(unapplied),
            calls=sum(calls for calls, _ in left.counters.values()),
            from_workers=left.from_workers,
            torn_lines=left.skipped,
        )
    journal.forget(segments)
    for path in workers:
        with contextlib.suppress(OSError):
            path.unlink()
    # Numbers only grow, whichever of the two is newer (a journal directory restored
    # from a backup, or one whose segments were all applied).
    journal.start(max([applied, *segments]))


def usage_steps(
    counters: Mapping[str, tuple[int, int | None]],
    deltas: dict[usage.Key, usage.Counts],
    redactions: dict[tuple[str, int, str], int],
    mark: tuple[str, int] | None,
) -> Callable[[Transaction], None]:
    """One flush's (or journal replay's) transaction: each client's calls and latest
    call, the day's usage and redactions, as increments; with `mark` (journal identity,
    segment), the record that the journal's segments up to that one are applied."""
    rows = [(calls, seen, seen, jti) for jti, (calls, seen) in counters.items()]
    marks = [(*mark, int(time.time()))] if mark is not None else []
    return _steps(
        (_COUNTERS_SQL, rows),
        (usage.UPSERT_SQL, usage.delta_rows(deltas)),
        (usage.REDACTIONS_UPSERT_SQL, usage.redaction_rows(redactions)),
        (JOURNAL_MARK_SQL, marks),
    )


def _steps(*steps: tuple[str, Sequence[Sequence[Any]]]) -> Callable[[Transaction], None]:
    """A transaction of (sql, rows) steps, each run once per row; empty ones skipped."""

    def run(tx: Transaction) -> None:
        for sql, rows in steps:
            if rows:
                tx.executemany(sql, rows)

    return run
