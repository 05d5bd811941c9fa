"""The memory half of the registry: every client record, and today's usage and spend.

What the request path reads (`get`, `tokens_used`, `usd_spent_month`, ...) and counts
(`record_call`) lives here, behind one lock held only briefly, and never waits on the
database. `registry.Registry` adds the other half: every change goes to the database
first and reaches this mirror only once committed (`_keep`), and rows read back from the
database are taken in with `_learn`, which keeps this node's counts not yet written.
Counted calls also go to the usage journal (journal.py), if the registry has one, under
the same lock, so that each flush's segment holds exactly the counts it takes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import replace

from vibectld.store import spend, usage
from vibectld.store.base import ChangeCallback, KeyChangeCallback
from vibectld.store.journal import UsageJournal
from vibectld.store.records import _LIST_HINT, ClientNotFound, ClientRecord, _now, _quote
from vibectld.store.usage import UsageRow

_NEVER = 2**63


def _counted(record: ClientRecord, now: int) -> ClientRecord:
    """`record` with one more request, seen at `now`.

    What `dataclasses.replace` gives, at an eighth of its cost (~0.6 us, not ~4.8: it
    re-runs the frozen __init__ over all 17 fields), on every served call's path. Valid
    while ClientRecord is a frozen dataclass with a __dict__ and no __post_init__
    (tests/unit/test_mirror_counted.py).
    """
    counted = object.__new__(ClientRecord)
    state = counted.__dict__
    state.update(record.__dict__)
    state["requests"] = record.requests + 1
    state["last_seen_at"] = max(now, record.last_seen_at or 0)
    return counted


class Mirror:
    def __init__(
        self,
        records: dict[str, ClientRecord],
        book: usage.UsageBook | None = None,
        spent: spend.SpendBook | None = None,
    ) -> None:
        self._records = records
        # Names never change and records are never deleted, so this index only grows.
        self._ids_by_name: dict[str, list[str]] = {}
        for record in records.values():
            self._ids_by_name.setdefault(record.name, []).append(record.id)
        self._usage = book if book is not None else usage.UsageBook()
        self._spend = spent if spent is not None else spend.SpendBook()
        self._pending: dict[str, int] = {}  # client id -> calls not yet in the database
        # (valid from, valid until, counts): the heartbeat asks every few seconds, and a
        # scan of 100,000 records costs ~15 ms of the loop; a change of any status drops it.
        self._counts: tuple[int, int, dict[str, int]] | None = None
        self._callbacks: list[ChangeCallback] = []
        self._key_callbacks: list[KeyChangeCallback] = []
        self._lock = threading.Lock()  # memory; held briefly
        # Where counted calls also go at once, so a killed node loses none (journal.py).
        self._journal: UsageJournal | None = None

    def get(self, jti: str) -> ClientRecord | None:
        """The record for a secret's jti; memory only, for the request path."""
        return self._records.get(jti)

    def find(self, name_or_id: str, now: int | None = None) -> ClientRecord:
        """By exact id; else by name, preferring the active client, else the newest."""
        now = _now(now)
        record = self._records.get(name_or_id)
        if record is not None:
            return record
        named = [self._records[i] for i in self._ids_by_name.get(name_or_id, ())]
        if not named:
            raise ClientNotFound(f"no client named or with id {_quote(name_or_id)}; {_LIST_HINT}")
        return max(named, key=lambda r: (r.status(now) == "active", r.created_at, r.id))

    def _merge(self, fresh: ClientRecord) -> ClientRecord:
        """A row read from the database plus this node's counts not yet written there."""
        mine = self._records.get(fresh.id)
        times = (fresh.last_seen_at, mine.last_seen_at if mine is not None else None)
        seen = [t for t in times if t is not None]
        merged = replace(
            fresh,
            requests=fresh.requests + self._pending.get(fresh.id, 0),
            last_seen_at=max(seen) if seen else None,
        )
        if mine is not None and mine.revoked_at is not None and fresh.revoked_at is None:
            # A revocation is final, but a row read before it committed can arrive after
            # it (the feed's read racing this node's own revoke): never take it back.
            merged = replace(
                merged,
                revoked_at=mine.revoked_at,
                revoked_by=mine.revoked_by,
                revoke_reason=mine.revoke_reason,
            )
        return merged

    def _keep(self, record: ClientRecord) -> ClientRecord:
        """Put `record` in memory (under _lock)."""
        if record.id not in self._records:
            self._ids_by_name.setdefault(record.name, []).append(record.id)
        self._records[record.id] = record
        self._counts = None
        return record

    def _learn(self, found: Iterable[ClientRecord]) -> list[ClientRecord]:
        """Take rows read from the database into memory; those memory did not have as
        they are (new, or changed by another node)."""
        learned = []
        with self._lock:
            for fresh in found:
                merged = self._merge(fresh)
                mine = self._records.get(fresh.id)
                if mine is None or replace(mine, requests=0, last_seen_at=None) != replace(
                    merged, requests=0, last_seen_at=None
                ):
                    learned.append(self._keep(merged))
        return learned

    def _notify(self, changed: list[ClientRecord]) -> None:
        for record in changed:
            for callback in list(self._callbacks):
                # The change is committed; a callback's failure must not undo the reply.
                try:
                    callback(record)
                except Exception:  # noqa: S112
                    continue

    def _notify_keys(self, kids: Iterable[str]) -> None:
        for kid in kids:
            for callback in list(self._key_callbacks):
                try:  # as _notify: one callback's failure must not stop the others
                    callback(kid)
                except Exception:  # noqa: S112
                    continue

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

    # Store.record_call's signature (store/base.py), restated: mypy checks the Registry,
    # which inherits it, against that Protocol.
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
            self._records[client_id] = _counted(record, now)
            self._pending[client_id] = self._pending.get(client_id, 0) + 1
            self._usage.record(client_id, now, call)
            self._spend.record(client_id, now, call.cost_usd)
            if self._journal is not None:
                self._journal.call(client_id, now, call)

    def record_redactions(self, client_id: str, *, now: int, found: dict[str, int]) -> None:
        """Count the secrets the server found in a call's prompt, per kind; no SQL.

        Counted whether the call was then served (redacted) or refused, so it is not a
        request of its own; unknown ids are ignored.
        """
        with self._lock:
            if client_id in self._records:
                self._usage.record_redactions(client_id, now, found)
                if self._journal is not None:
                    self._journal.redactions(client_id, now, found)

    def pending_calls(self) -> int:
        """Calls counted in memory and not yet written to the database; memory.

        A flush in progress holds its calls aside until it commits (or puts them back if
        it fails), so they are not counted while it runs.
        """
        with self._lock:
            return sum(self._pending.values())

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

    def on_change(self, callback: ChangeCallback) -> None:
        self._callbacks.append(callback)

    def on_key_change(self, callback: KeyChangeCallback) -> None:
        self._key_callbacks.append(callback)

    def _name(self, client_id: str) -> str:
        record = self._records.get(client_id)
        return record.name if record is not None else client_id
