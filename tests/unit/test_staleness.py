"""When a node is stale, and what it says about it (vibectld/service/staleness.py).

The store here is a stand-in for the Store's memory half only (freshness, health, the
buffered count): staleness is a pure judgement on those. The database side is tested
against a real PostgreSQL in tests/integration/test_storage_outage.py.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from vibectld.admin.cli.reports import _node, _storage
from vibectld.config import StorageConfig
from vibectld.service.staleness import (
    admin_refusal,
    is_stale,
    node_silent,
    stale_refusal,
    status_note,
    storage_state,
)
from vibectld.store.base import NodeInfo, Store, StoreHealth
from vibectld.store.registry import Registry

NOW = 1_800_000_000.0


@dataclass
class SharedView:
    """What staleness reads of a shared store: its view's age and its health."""

    age: float
    health_: StoreHealth = field(default_factory=lambda: StoreHealth(degraded=False))
    backend: str = "postgresql"
    pending: int = 0

    def freshness(self, now: float | None = None) -> float | None:
        return self.age

    def health(self) -> StoreHealth:
        return self.health_

    def pending_calls(self) -> int:
        return self.pending


def _shared(age: float, **rest: Any) -> Store:
    return cast(Store, SharedView(age, **rest))


def _down(since: float) -> StoreHealth:
    return StoreHealth(degraded=True, reason="cannot reach the PostgreSQL database", since=since)


def test_a_view_older_than_max_staleness_is_stale() -> None:
    assert not is_stale(_shared(age=0.4), 5.0, NOW)
    assert not is_stale(_shared(age=5.0), 5.0, NOW)
    assert is_stale(_shared(age=5.1), 5.0, NOW)


def test_a_connection_failing_for_longer_than_max_staleness_is_stale_whatever_the_feed_says() -> (
    None
):
    # Just failed: not yet (a blip is not an outage).
    assert not is_stale(_shared(age=0.3, health_=_down(NOW - 1)), 5.0, NOW)
    assert is_stale(_shared(age=0.3, health_=_down(NOW - 6)), 5.0, NOW)


def test_a_store_no_other_node_writes_is_never_stale(tmp_path: Path) -> None:
    registry = Registry.open(tmp_path / "registry.db")
    try:
        assert not is_stale(registry, 1.0, time.time() + 3600)
        state = storage_state(registry, StorageConfig(on_stale="refuse"))
        assert (state.stale, state.refusing, state.view_age) == (False, False, None)
    finally:
        registry.close()


def test_refusing_needs_stale_and_on_stale_refuse() -> None:
    store = _shared(age=9.0, health_=_down(NOW - 9), pending=42)
    serve = storage_state(store, StorageConfig(), NOW)
    refuse = storage_state(store, StorageConfig(on_stale="refuse"), NOW)
    assert serve.stale and not serve.refusing and serve.buffered_calls == 42
    assert refuse.stale and refuse.refusing
    fresh = storage_state(_shared(age=0.2), StorageConfig(on_stale="refuse"), NOW)
    assert fresh.healthy and not fresh.refusing and status_note(fresh) is None


def test_messages_say_since_when_why_and_what_still_works() -> None:
    since = calendar.timegm((2026, 12, 2, 14, 2, 7, 0, 0, 0))
    store = _shared(age=9.0, health_=_down(since))
    serve = storage_state(store, StorageConfig(), since + 9)
    assert admin_refusal(serve) == (
        "the database is unreachable since 14:02:07 UTC (cannot reach the PostgreSQL "
        "database); admin changes are refused until it answers; known clients are still served"
    )
    refuse = storage_state(store, StorageConfig(on_stale="refuse"), since + 9)
    assert "calls are refused too" in admin_refusal(refuse, "usage cannot be read")
    assert admin_refusal(refuse, "usage cannot be read").count("usage cannot be read") == 1
    assert status_note(serve) == (
        "storage degraded since 14:02:07 UTC, admin changes refused; "
        "storage view stale: serving known clients"
    )
    assert "refusing calls (storage.on_stale: refuse)" in (status_note(refuse) or "")
    refusal = stale_refusal(store)
    assert refusal.code.name == "UNAVAILABLE" and refusal.reason == "stale_storage"
    assert "cannot reach its database since 14:02:07 UTC" in refusal.message
    assert "another node may answer" in refusal.message


def test_status_shows_degraded_stale_and_silent_nodes() -> None:
    line = _storage(
        {
            "backend": "postgresql",
            "degraded": True,
            "reason": "cannot reach the PostgreSQL database",
            "since": "2020-01-01T14:02:07Z",
            "view_age_seconds": 12.5,
            "stale": True,
            "max_staleness_seconds": 5.0,
            "on_stale": "serve",
            "refusing_calls": False,
            "buffered_calls": 7,
        }
    )
    assert line.startswith("postgresql, DEGRADED since 2020-01-01 14:02:07 UTC: cannot reach")
    assert "STALE: serving the clients it knows (on_stale: serve)" in line
    assert "7 calls' usage waiting in memory" in line
    healthy = _storage(
        {
            "backend": "postgresql",
            "degraded": False,
            "view_age_seconds": 0.3,
            "stale": False,
            "max_staleness_seconds": 5.0,
            "on_stale": "refuse",
        }
    )
    assert healthy == "postgresql, other nodes' changes read 0.3s ago (stale past 5s: refuse)"
    node = NodeInfo("b", "10.0.0.2:50051", "1.0", 3, int(NOW - 100), int(NOW - 30))
    assert node_silent(node, NOW) and not node_silent(node, NOW - 25)
    shown = _node({**node.to_dict(), "heartbeat_age_seconds": 30, "silent": True})
    assert shown.endswith("last heartbeat 0m 30s ago (SILENT: down, or cut off from the database)")
