"""The store interface: everything the daemon asks of its state, and the SQL seam under it.

Two layers, after Teleport's lib/backend:

- `Store` is what the rest of vibectld uses (the admin routes, the servicer, the
  daemon's lifecycle): clients, usage, spend, redaction counts, audit, and what several
  nodes need (a change feed, freshness, heartbeats, health). One implementation,
  `registry.Registry`, holds the logic: a memory mirror of the database that the request
  path reads without waiting on any disk or network.
- `Database` is the small seam the mirror writes through: one committed transaction, or
  one read. `sqlite.SQLiteDatabase` and `postgresql.PostgreSQLDatabase` implement it; SQL
  is written once, with `?` placeholders, in the dialect both engines accept.

Every backend passes the same contract suite (tests/store/test_contract.py). The method
signatures below are restated by Registry on purpose: a Protocol is checked against them.

Calling conventions, for every method below:

- "memory": answers from the mirror, never blocks on I/O; safe on the event loop, from
  any thread.
- "database": blocks on the engine (an fsync for SQLite, a network round trip for
  PostgreSQL); call it off the event loop (`asyncio.to_thread`). Failures of the engine
  raise `StorageFailure` (a `RegistryError`) with a message that says what to check, and
  mark the store degraded until the next success.
- Writes commit before memory changes and before they return, so an acknowledged change
  survives a crash of this process (and, for PostgreSQL, of this node).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, TypeVar

from vibectld.store.audit import AuditEntry
from vibectld.store.records import UNSET, ClientRecord
from vibectld.store.usage import UsageRow

T = TypeVar("T")

# Called with a client record this node learned had changed elsewhere (another node's
# revocation, update or issue), from whichever thread learned it: hand the work to the
# event loop (loop.call_soon_threadsafe) rather than touching loop state in the callback.
ChangeCallback = Callable[[ClientRecord], None]
# Called with the kid of a signing key made, retired or otherwise changed (on any node,
# this one included), from the thread that learned it; the same care as ChangeCallback.
KeyChangeCallback = Callable[[str], None]


@dataclass(frozen=True)
class NodeInfo:
    """One vibectld node as its heartbeat last described it."""

    name: str  # server.name: each node of a cluster needs its own
    address: str  # where it serves gRPC (host:port)
    version: str
    in_flight: int  # calls running on it
    started_at: int  # unix time
    heartbeat_at: int  # unix time of this heartbeat

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class StoreHealth:
    """Whether the database answered the last time the store asked it."""

    degraded: bool
    reason: str | None = None  # the last failure's message while degraded
    since: float | None = None  # unix time of the first failure in a row


class Store(Protocol):
    """The daemon's state. See the module's docstring for "memory" and "database"."""

    @property
    def backend(self) -> str:
        """The engine, "sqlite" or "postgresql"; memory."""
        ...

    # -- clients --------------------------------------------------------------------------

    def get(self, jti: str) -> ClientRecord | None:
        """The record of a secret's jti, or None; memory (the request path calls it)."""
        ...

    def find(self, name_or_id: str, now: int | None = None) -> ClientRecord:
        """By exact id; else by name, the active client first, else the newest; memory.

        ClientNotFound if this node knows no such client.
        """
        ...

    def clients(
        self, *, include_inactive: bool = False, now: int | None = None
    ) -> list[ClientRecord]:
        """The active clients (or all), oldest first; memory."""
        ...

    def counts(self, now: int | None = None) -> dict[str, int]:
        """{"active": n, "expired": n, "revoked": n}; memory."""
        ...

    def active_by_kid(self, now: int | None = None) -> dict[str | None, int]:
        """Active clients per signing kid (None: issued before kids were kept); memory."""
        ...

    def active_signed_by(self, kid: str, now: int | None = None) -> list[ClientRecord]:
        """The active clients whose secrets `kid` signed; memory."""
        ...

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
        """Record a new client (its id is the secret's jti); database, then memory.

        InvalidRecord for bad input (nothing written); DuplicateClient if the database
        holds an active client of that name, whichever node issued it.
        """
        ...

    def revoke(
        self, name_or_id: str, *, by: str, reason: str | None = None, now: int | None = None
    ) -> ClientRecord:
        """Revoke a client; database, then memory (the next request is refused).

        ClientNotFound; AlreadyRevoked if it was revoked before, here or on another node.
        Cancelling the client's open calls is the caller's job.
        """
        ...

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
        """Change an active client's limits, models or note; database, then memory.

        UNSET leaves a field, None clears it; only the fields given are written, so an
        update on another node to other fields is kept. InvalidRecord, ClientNotFound,
        AlreadyRevoked (revoked or expired).
        """
        ...

    # -- usage and spend: memory at once, the database at the next flush -----------------
    #
    # With several nodes (a shared database), each flush also reads the day's and the
    # month's totals back, so what the budgets read below is every node's flushed counts
    # plus this node's unflushed ones: another node's call counts here at most its flush
    # interval plus ours after it was served (2 s + 2 s with the daemon's flush loop).

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
        """Count a served call for its client and UTC day; memory, never raises."""
        ...

    def record_redactions(self, client_id: str, *, now: int, found: dict[str, int]) -> None:
        """Count secrets found in a call's prompt, per kind; memory."""
        ...

    def tokens_used(self, client_id: str, now: int) -> int:
        """The client's input plus output tokens on the UTC day of `now`; memory."""
        ...

    def usd_spent_month(self, client_id: str, now: float) -> float:
        """The client's dollars in the UTC month of `now`; memory."""
        ...

    def usd_spent_day(self, now: float) -> float:
        """Every client's dollars on the UTC day of `now`; memory."""
        ...

    def top_today(self, now: int, limit: int = 5) -> list[UsageRow]:
        """The busiest clients of the UTC day of `now` (every node's, as of this node's
        last flush, on a shared database); memory."""
        ...

    def usage(
        self, *, since_day: str, name_or_id: str | None = None, now: int | None = None
    ) -> list[UsageRow]:
        """Usage per client since a UTC day (YYYY-MM-DD); database (flushes first).

        The totals are the database's, so with several nodes they are every node's
        flushed counts.
        """
        ...

    def pending_calls(self) -> int:
        """Calls counted but not yet written to the database (while it is away, the
        buffered usage); memory. The counts are per client and UTC day, so memory
        grows with the clients that call, not with the calls."""
        ...

    def flush(self) -> None:
        """Write the counts taken since the last flush in one transaction; database.

        Counts are written as increments, so nodes sharing a database add up. On
        failure nothing is lost: the counts stay for the next flush. On a shared
        database, then read back the day's and the month's totals (two reads: the day's
        usage rows, and the month's dollars before today every few minutes).
        """
        ...

    # -- audit ------------------------------------------------------------------------------

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
        """Commit one audit row (secret-shaped text redacted); database."""
        ...

    def audit(self, *, since: int, limit: int = 1000) -> list[AuditEntry]:
        """The newest `limit` rows at or after `since`, oldest first; database."""
        ...

    # -- several nodes ----------------------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> None:
        """Call `callback` with each client record this node learns changed elsewhere.

        On a shared database the change feed calls it from its own thread as soon as
        another node's change commits (milliseconds; at most half a second if a
        notification is lost), and a write of this node that meets such a change first
        calls it too. Not called for this node's own writes (their callers act on them).
        Memory.
        """
        ...

    def on_key_change(self, callback: KeyChangeCallback) -> None:
        """Call `callback` with the kid of each signing key change the feed brings.

        A shared database only (the change is recorded with feed.record_change(tx,
        SIGNING_KEY, kid, now) in the transaction that makes it). Unlike on_change, this
        node's own key changes are delivered too: the callback reloads the key, which is
        idempotent. After a gap in the feed (the node was away longer than the feed is
        kept), it is called for every kid in the database. Memory.
        """
        ...

    def freshness(self, now: float | None = None) -> float | None:
        """Seconds since this node's view of other nodes' changes was last brought up to
        date (the start of the change feed's last successful read, at least every half
        second while the database answers); None when no other node can write the
        database (SQLite). Memory."""
        ...

    def heartbeat(self, node: NodeInfo) -> None:
        """Record that `node` (this one) is alive, and refresh `nodes()`; database for a
        shared backend, memory for SQLite. A shared backend also forgets nodes silent
        for a day and, now and then, change feed rows older than a day."""
        ...

    def nodes(self) -> list[NodeInfo]:
        """Every node as of this node's last heartbeat, by name; memory."""
        ...

    def health(self) -> StoreHealth:
        """Degraded while the database's last answer was a failure; memory."""
        ...

    def close(self) -> None:
        """Flush and close; later calls do nothing. Database."""
        ...


# -- the SQL seam ---------------------------------------------------------------------------


class Transaction(Protocol):
    """The statements of one transaction. SQL uses `?` placeholders."""

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a query and return every row."""
        ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement and return how many rows it changed."""
        ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run a statement once per row of parameters."""
        ...

    def lock(self, key: str) -> None:
        """Hold `key` until the transaction ends, against every other writer of the
        database (PostgreSQL: an advisory lock; SQLite's write transactions are already
        serialised)."""
        ...


class Database(Protocol):
    """An SQL engine the memory mirror writes through; not thread-safe (the Registry
    serialises its use)."""

    backend: str  # "sqlite" | "postgresql"
    # Whether other processes (nodes) write the same database, so that memory can be
    # behind it.
    shared: bool

    def transaction(self, work: Callable[[Transaction], T]) -> T:
        """Run `work` in one transaction, committed durably before this returns.

        An exception from `work` rolls back and propagates unchanged; a failure of the
        engine raises StorageFailure.
        """
        ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """One read outside a write transaction; StorageFailure on an engine failure."""
        ...

    def close(self) -> None:
        """Close the connection; later calls raise StorageFailure."""
        ...
