"""Whether this node can vouch for its view of the shared store, and what follows from it.

A node serves from memory (store/mirror.py); with several nodes on one PostgreSQL
database, memory learns of other nodes' revocations through the change feed. A node
whose view is older than `storage.max_staleness` is *stale*: it cannot tell whether a
secret it knows was revoked elsewhere since. Two signs, either enough:

- the store's `freshness()`: seconds since the feed last brought the view up to date;
- the store's `health()`: its own connection has been failing for longer than
  max_staleness (a sign that does not depend on the feed's thread being alive).

A stale node follows `storage.on_stale`: `serve` keeps serving the clients it knows
(expiry still applies), `refuse` answers every call with UNAVAILABLE until its view is
fresh again (service/gate.py). A store nobody else writes (SQLite: `freshness()`
is None) is never stale.

Separately, while the database does not answer at all (`degraded`), admin changes are
refused at once (admin/storage_gate.py) instead of each waiting out a connection timeout.
Everything here reads memory only: the call gate asks on every call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from vibectld.config import StorageConfig
from vibectld.service.refusals import Unavailable
from vibectld.store.base import NodeInfo, Store

# A node whose heartbeat (every 2 s) is older than this is marked in `status`: it has
# missed five in a row, so it is down or cut off from the database.
NODE_SILENT_SECONDS = 10.0


def clock_time(at: float | None) -> str:
    """HH:MM:SS UTC of a unix time, for messages an operator reads during an outage."""
    if at is None:
        return "an unknown time"
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


def shares_store(store: Store) -> bool:
    """Whether other nodes write this store (PostgreSQL), so that its view can be old."""
    return store.freshness() is not None


def is_stale(store: Store, max_staleness: float, now: float) -> bool:
    """Whether the view is older than `max_staleness` seconds; memory, cheap (every call)."""
    age = store.freshness(now)
    if age is None:
        return False  # no other node writes this store
    if age > max_staleness:
        return True
    health = store.health()
    return health.degraded and health.since is not None and now - health.since > max_staleness


@dataclass(frozen=True)
class StorageState:
    """The store as `status`, the health service, the metrics and the logs report it."""

    backend: str
    # The database's last answer was a failure: admin changes are refused meanwhile.
    degraded: bool
    reason: str | None
    since: float | None  # unix time of the first failure in a row
    view_age: float | None  # seconds; None: no other node writes the store
    stale: bool
    max_staleness: float
    on_stale: str
    buffered_calls: int  # served, counted in memory, not yet in the database

    @property
    def refusing(self) -> bool:
        """Whether calls are refused: stale, and the operator asked for strictness."""
        return self.stale and self.on_stale == "refuse"

    @property
    def healthy(self) -> bool:
        return not (self.degraded or self.stale)


def storage_state(store: Store, config: StorageConfig, now: float | None = None) -> StorageState:
    now = time.time() if now is None else now
    health = store.health()
    return StorageState(
        backend=store.backend,
        degraded=health.degraded,
        reason=health.reason,
        since=health.since,
        view_age=store.freshness(now),
        stale=is_stale(store, config.max_staleness_seconds, now),
        max_staleness=config.max_staleness_seconds,
        on_stale=config.on_stale,
        buffered_calls=store.pending_calls(),
    )


def node_silent(node: NodeInfo, now: float) -> bool:
    """Whether a node's last heartbeat is old enough to say so in `status`."""
    return now - node.heartbeat_at > NODE_SILENT_SECONDS


class StaleView(Unavailable):
    """A stale node with `storage.on_stale: refuse`: UNAVAILABLE, retryable elsewhere."""

    @property
    def reason(self) -> str:
        return "stale_storage"


def stale_refusal(store: Store) -> StaleView:
    health = store.health()
    since = f" since {clock_time(health.since)}" if health.degraded else ""
    return StaleView(
        f"this vibectld node cannot reach its database{since}, so it cannot tell whether "
        "your secret is still valid; retry: another node may answer"
    )


def admin_refusal(state: StorageState, what: str = "admin changes are refused") -> str:
    """Why an admin operation that needs the database fails at once while it is away."""
    served = (
        "calls are refused too while this node's view is stale (storage.on_stale: refuse)"
        if state.on_stale == "refuse"
        else "known clients are still served"
    )
    return (
        f"the database is unreachable since {clock_time(state.since)} ({state.reason}); "
        f"{what} until it answers; {served}"
    )


def status_note(state: StorageState) -> str | None:
    """The storage's part of the systemd STATUS= line; None while all is well."""
    parts = []
    if state.degraded:
        parts.append(f"storage degraded since {clock_time(state.since)}, admin changes refused")
    if state.refusing:
        parts.append("storage view stale: refusing calls (storage.on_stale: refuse)")
    elif state.stale:
        parts.append("storage view stale: serving known clients")
    return "; ".join(parts) or None
