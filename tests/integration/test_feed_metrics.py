"""A node's Prometheus endpoint shows its change feed listener losing its connection and
connecting again (vibectld_feed_*), as vibectld(8) documents.

A real vibectld on `storage.backend: postgresql` with `metrics.listen` set, a real
PostgreSQL 15; the listener's session is ended from the server (pg_terminate_backend,
as an administrator or a failover would), so the loss is real. The listener's own
behaviour (backoff, catch-up, counts while the server is down) is in
tests/store/test_feed_metrics.py.
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningDaemon
from tests.integration.test_storage_outage import OutageNode, start_node
from tests.postgres import Postgres
from tests.store.test_feed_metrics import terminate_listeners

__all__ = ["start_node"]  # the fixture


def _scrape(daemon: RunningDaemon) -> dict[str, float]:
    port = daemon.runtime.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        name: float(value)
        for name, value in re.findall(
            r"^(vibectld_feed_\w+|vibectld_storage_view_age_seconds) (\S+)$", text, re.MULTILINE
        )
    }


def _until(what: str, check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not {what} within {seconds} s")
        time.sleep(0.05)


def _reconnects(daemon: RunningDaemon, n: int) -> Callable[[], bool]:
    return lambda: _scrape(daemon)["vibectld_feed_reconnects_total"] == n


def test_metrics_count_the_feed_listener_reconnecting(
    postgres: Postgres, start_node: Callable[[OutageNode], RunningDaemon], tmp_path: Path
) -> None:
    node = OutageNode(tmp_path, "node-a", "serve")
    node.install_dsn(postgres.dsn)
    daemon = start_node(node)
    _until("connected", lambda: _scrape(daemon).get("vibectld_feed_connected") == 1.0)
    before = _scrape(daemon)
    assert before["vibectld_feed_reconnects_total"] == 0.0
    assert before["vibectld_feed_failures_total"] == 0.0

    for n in (1, 2):
        terminate_listeners(postgres.dsn, 1)
        _until(f"reconnected {n} times", _reconnects(daemon, n))
        now = _scrape(daemon)
        assert now["vibectld_feed_failures_total"] == n
        assert now["vibectld_feed_connected"] == 1.0
        # The time since the last catch-up is back under its period once reconnected.
        _until("fresh", lambda: _scrape(daemon)["vibectld_storage_view_age_seconds"] < 1.0)
    assert _scrape(daemon)["vibectld_feed_reloads_total"] == 0.0
