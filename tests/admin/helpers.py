"""Helpers for the admin tests: a threaded AdminServer and clients running as nobody."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vibectld.admin.server import AdminServer

NOBODY = 65534

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: the test runs a client as uid 65534 (nobody)"
)


class ServerThread:
    """An AdminServer served by an event loop in a daemon thread."""

    def __init__(self, server: AdminServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="admin-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def start(self) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            raise

    def stop(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


StartServer = Callable[..., ServerThread]

_DROP = "os.setgroups([]); os.setgid(65534); os.setuid(65534)"

_CLIENT_DRIVER = f"""
import json, os, sys
from pathlib import Path
from vibectld.admin.client import AdminClient, AdminClientError
{_DROP}
try:
    with AdminClient(Path(sys.argv[1]), timeout=10) as client:
        out = {{"ok": True, "result": client.call(sys.argv[2], json.loads(sys.argv[3]))}}
except AdminClientError as e:
    out = {{"ok": False, "type": type(e).__name__, "code": e.code, "message": e.message}}
print(json.dumps(out))
"""

_CLI_DRIVER = f"""
import os
from vibectld.admin.cli import main
{_DROP}
main()
"""


def call_as_nobody(path: Path, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call `op` from a subprocess that drops to uid/gid 65534 after its imports.

    Privileges are dropped inside the child rather than in preexec_fn because
    the interpreter may live where uid 65534 cannot read it (e.g. under /root).
    """
    proc = subprocess.run(
        [sys.executable, "-c", _CLIENT_DRIVER, str(path), op, json.dumps(args or {})],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd="/",
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def cli_as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _CLI_DRIVER, *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
