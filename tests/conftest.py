"""Shared fixtures: a real vibectld on port 0 with real TLS and a real admin socket.

The daemon runs in this process, on its own event loop in a background
thread, so tests can reach its runtime; clients talk to it only through real
gRPC channels and the real admin socket. The only fakes are the models, which
arrive through llm's plugin registry (tests/fake_models.py).
"""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from llm.plugins import pm

from tests import fake_models
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.proxy_url import parse as parse_url
from vibectld.admin.client import AdminClient
from vibectld.config import DaemonConfig
from vibectld.config_file import parse_config
from vibectld.daemon import Daemon
from vibectld.runtime import Runtime


def _register_fake_models() -> None:
    if not pm.is_registered(fake_models):
        pm.register(fake_models, name="vibectld-test-models")


class RunningDaemon:
    """A started Daemon plus the ways a test talks to it."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.daemon = Daemon(config)
        self._channels: list[grpc.Channel] = []

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> RunningDaemon:
        self.thread.start()
        self.run(self.daemon.start())
        return self

    def stop(self) -> None:
        for channel in self._channels:
            channel.close()
        try:
            self.run(self.daemon.stop(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    @property
    def runtime(self) -> Runtime:
        assert self.daemon.runtime is not None
        return self.daemon.runtime

    @property
    def port(self) -> int:
        return self.daemon.grpc_port

    @property
    def ca_pem(self) -> bytes:
        path = self.config.state_dir / "tls" / "ca.pem"
        if path.exists():
            return path.read_bytes()
        # A node of a cluster writes no CA there: it serves the cluster's, from the database.
        ca = self.runtime.tls.ca_pem
        assert ca is not None, f"no {path}, and the daemon serves no private CA"
        return ca

    def admin(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        with AdminClient(self.config.admin.socket) as client:
            return client.call(op, args or {})

    def issue(self, name: str, **args: Any) -> str:
        """Issue a client and return its secret."""
        url = self.admin("issue_client", {"name": name, **args})["url"]
        secret = parse_url(url).secret
        assert secret
        return secret

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        channel = grpc.secure_channel(f"localhost:{self.port}", creds)
        self._channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.VibectlLLMProxyStub:
        return pb_grpc.VibectlLLMProxyStub(self.channel())


def admin_cli(daemon: RunningDaemon, *args: str) -> subprocess.CompletedProcess[str]:
    """The real vibectl-admin, as a process, against `daemon`'s admin socket."""
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "vibectl-admin"),
            "--socket",
            str(daemon.config.admin.socket),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def short_tmpdir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="vd-", dir="/tmp"))


def make_config(state_dir: Path, sock_dir: Path, **overrides: Any) -> DaemonConfig:
    raw: dict[str, Any] = {
        # One process unless a test asks for more (the in-process Daemon is one anyway;
        # multi-worker semantics are tested in tests/integration/test_workers.py).
        "server": {"listen": "127.0.0.1:0", "name": "test-server", "workers": 1},
        "admin": {
            "socket": str(sock_dir / "admin.sock"),
            "group": grp.getgrgid(os.getgid()).gr_name,
        },
        "state_dir": str(state_dir),
        "models": {"default": "echo"},
        "limits": {"requests_per_minute": None, "concurrent_requests": None},
        "logging": {"level": "warning", "format": "console"},
    }
    for section, values in overrides.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return parse_config(raw)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_daemon(tmp_path: Path, sock_dir: Path) -> Iterator[Callable[..., RunningDaemon]]:
    """Start a daemon with config overrides; all started daemons stop at teardown."""
    _register_fake_models()
    started: list[RunningDaemon] = []

    def start(state_dir: Path | None = None, **overrides: Any) -> RunningDaemon:
        config = make_config(state_dir or tmp_path / "state", sock_dir, **overrides)
        running = RunningDaemon(config).start()
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        if running.thread.is_alive():
            running.stop()


@pytest.fixture
def daemon(start_daemon: Callable[..., RunningDaemon]) -> RunningDaemon:
    return start_daemon()
