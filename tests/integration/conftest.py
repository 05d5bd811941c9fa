"""Fixtures the integration tests share.

PostgreSQL for the tests that run vibectld on `storage.backend: postgresql`
(tests/postgres.py: one server per session, started only when a test asks for it, one
fresh database per test) is imported here so that pytest registers its fixtures.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningDaemon
from tests.postgres import postgres, postgres_server
from vibectld.config_file import load_config

__all__ = ["from_file", "postgres", "postgres_server", "write"]


def write(path: Path, raw: dict[str, Any]) -> None:
    """A config file with `raw` in it (JSON is YAML); one serving process unless `raw`
    asks for more (the suite tests single-process semantics everywhere, multi-worker ones
    in test_workers.py, and `auto` would be 2 processes per daemon on CI's 2 cores)."""
    server = raw.get("server", {})
    if isinstance(server, dict) and "workers" not in server:
        raw = {**raw, "server": {**server, "workers": 1}}
    path.write_text(json.dumps(raw))


@pytest.fixture
def from_file(
    tmp_path: Path, sock_dir: Path, start_daemon: Callable[..., RunningDaemon]
) -> Iterator[Callable[[dict[str, Any]], tuple[RunningDaemon, Path]]]:
    started: list[RunningDaemon] = []

    def start(raw: dict[str, Any]) -> tuple[RunningDaemon, Path]:
        path = tmp_path / "config.yaml"
        write(path, raw)
        running = RunningDaemon(load_config(path)).start()
        started.append(running)
        return running, path

    yield start
    for running in started:
        running.stop()
