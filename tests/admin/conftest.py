"""Fixtures for the admin channel: a real AdminServer on a real Unix socket.

The server runs in a background thread with its own event loop, so tests can
use the synchronous AdminClient (and subprocesses) against it.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from structlog.typing import EventDict

from vibectld.admin.server import AdminServer, Route

from .helpers import ServerThread, StartServer


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    """Every structlog record while the test runs (and nothing printed to stdout)."""
    with structlog.testing.capture_logs() as entries:
        yield entries


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory uid 65534 can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="vibectld-admin-test-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def serve(logs: list[EventDict]) -> Iterator[StartServer]:
    """Start AdminServers: serve(path, routes, group=..., **kw) -> ServerThread."""
    started: list[ServerThread] = []

    def start(
        path: Path, routes: Mapping[str, Route], group: str | None = "vibectld-admin", **kw: Any
    ) -> ServerThread:
        thread = ServerThread(AdminServer(path, group, routes, **kw))
        thread.start()
        started.append(thread)
        return thread

    yield start
    for thread in reversed(started):
        thread.stop()
