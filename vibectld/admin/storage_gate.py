"""The store as the admin socket sees it: a gate before what needs its database, and
the store's part of `status`.

With several nodes on one PostgreSQL database, an unreachable database is an outage of
admin, not of service (storage.on_stale in vibectld.yaml(5)): clients are served from
memory, and every operation that must reach the database fails at once with a message
that says since when and why, instead of each one waiting out a connection timeout.
"""

from __future__ import annotations

import time
from typing import Any

from vibectl.util.timefmt import iso
from vibectld.admin.protocol import ErrorCode
from vibectld.admin.server import AdminError, Caller, Handler, Route
from vibectld.runtime import Runtime
from vibectld.service.staleness import (
    StorageState,
    admin_refusal,
    node_silent,
    shares_store,
    storage_state,
)

# Reads that go to the database (the other reads answer from memory).
READS_FROM_DATABASE = frozenset({"audit", "usage"})
# A write route that needs no database: a reload changes no stored state, and the
# operator may need one during an outage (to change storage.on_stale, say).
WRITES_WITHOUT_DATABASE = frozenset({"reload"})


def gate_database(rt: Runtime, routes: dict[str, Route]) -> dict[str, Route]:
    """`routes`, with every write (but a reload) and every read of the database gated."""
    return {
        op: Route(_needs_database(rt, op, route.handler), route.write)
        if _gated(op, route)
        else route
        for op, route in routes.items()
    }


def _gated(op: str, route: Route) -> bool:
    if route.write:
        return op not in WRITES_WITHOUT_DATABASE
    return op in READS_FROM_DATABASE


def _needs_database(rt: Runtime, op: str, handler: Handler) -> Handler:
    """`handler`, refused at once while a shared store's database does not answer.

    The store's health is memory; the daemon's flush loop tries the database every
    0.5 s meanwhile, so the gate opens within about that once it answers. A SQLite file
    has no outage to wait out (its failures are answered as they happen): not gated.
    """
    what = f"{op} cannot be read" if op in READS_FROM_DATABASE else "admin changes are refused"

    async def gated(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        store = rt.registry
        if shares_store(store) and store.health().degraded:
            state = storage_state(store, rt.generation.config.storage)
            raise AdminError(ErrorCode.FAILED, admin_refusal(state, what))
        return await handler(caller, args)

    return gated


def storage_status(rt: Runtime) -> dict[str, Any]:
    """The store's part of `status`: its backend and health, and (when shared) the nodes."""
    store = rt.registry
    now = time.time()
    part: dict[str, Any] = {
        "storage": _storage_json(storage_state(store, rt.generation.config.storage, now))
    }
    if store.backend == "postgresql":
        part["nodes"] = [
            {
                **node.to_dict(),
                "heartbeat_age_seconds": max(0, int(now - node.heartbeat_at)),
                # No heartbeat for a while: the node is down or cut off from the database.
                "silent": node_silent(node, now),
            }
            for node in store.nodes()
        ]
    return part


def _storage_json(state: StorageState) -> dict[str, Any]:
    return {
        "backend": state.backend,
        "degraded": state.degraded,
        "reason": state.reason,
        # When the database stopped answering; null while it answers.
        "since": iso(int(state.since)) if state.degraded and state.since is not None else None,
        # How old this node's view of other nodes' changes is; null: always fresh.
        "view_age_seconds": None if state.view_age is None else round(state.view_age, 1),
        "stale": state.stale,
        "max_staleness_seconds": state.max_staleness,
        "on_stale": state.on_stale,
        # True while this node refuses calls (stale, with on_stale: refuse).
        "refusing_calls": state.refusing,
        # Calls served and counted in memory, not yet written to the database.
        "buffered_calls": state.buffered_calls,
    }
