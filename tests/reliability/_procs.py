"""vibectld as a real process for the reliability tests: start, signal, kill -9, restart.

`DaemonProcess` runs the real `vibectld` command (or, with `fake_models=True`, the same
`vibectld.cli.main` with tests/fake_models.py registered through llm's plugin manager, so
the `faults` model is there) in its own process with its own config file, state
directory, admin socket and a NOTIFY_SOCKET as systemd would provide one. Readiness and
reloads are observed through that socket, never guessed with sleeps. Every wait has a
timeout.

Run as a module (`python -m tests.reliability._procs --config FILE`) it is the
fake-models entry point itself.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.proxy_url import parse as parse_url
from vibectld.admin.client import AdminClient

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def short_tmpdir() -> Path:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    return Path(tempfile.mkdtemp(prefix="vdr-", dir="/tmp"))


def secret_of(url: str) -> str:
    secret = parse_url(url).secret
    assert secret
    return secret


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def execute(
    stub: pb_grpc.VibectlLLMProxyStub,
    secret: str,
    prompt: str = "hi",
    model: str | None = None,
    timeout: float = 30,
) -> str:
    """One Execute; the gRPC status name ("OK" for a served success), never raises.

    An in-band model error (a served call that failed) is reported as "MODEL:<code>".
    """
    request = pb.ExecuteRequest(user_fragments=[prompt])
    if model is not None:
        request.model_name = model
    try:
        reply: pb.ExecuteResponse = stub.Execute(request, metadata=auth(secret), timeout=timeout)
    except grpc.RpcError as e:
        return str(e.code().name)
    if reply.HasField("error"):
        return f"MODEL:{reply.error.error_code}"
    return "OK"


class Notify:
    """A NOTIFY_SOCKET: collects what the daemon tells systemd."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def mark(self) -> int:
        """A cursor: wait(after=mark()) only looks at messages that arrive later."""
        self._drain(0)
        return len(self.messages)

    def wait(self, match: Callable[[list[str]], bool], timeout: float, after: int = 0) -> str:
        """The first message (split into its lines) at or after `after` that matches."""
        deadline = time.monotonic() + timeout
        index = after
        while True:
            while index < len(self.messages):
                message = self.messages[index]
                index += 1
                if match(message.split("\n")):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching notification within {timeout} s: {self.messages}")
            self._drain(left)

    def _drain(self, timeout: float) -> None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        self.messages.append(data.decode())
        self.sock.setblocking(False)
        try:
            while True:
                self.messages.append(self.sock.recv(65536).decode())
        except BlockingIOError:
            pass

    def close(self) -> None:
        self.sock.close()


def ready(lines: list[str]) -> bool:
    return "READY=1" in lines


class DaemonProcess:
    """One vibectld process at a time over one state directory; restartable."""

    def __init__(self, root: Path, *, fake_models: bool = False, **overrides: Any) -> None:
        self.root = root
        self.sock_dir = short_tmpdir()
        self.fake_models = fake_models
        self.config_path = root / "config.yaml"
        self.state_dir = root / "state"
        self.admin_socket = self.sock_dir / "admin.sock"
        self.log_path = root / "vibectld.log"
        self.raw: dict[str, Any] = {
            # One process unless a test asks for workers: the suite tests single-process
            # semantics everywhere, multi-worker ones in tests/integration/test_workers.py
            # (and the default, auto, would be 2 processes per daemon on CI's 2 cores).
            "server": {"listen": "127.0.0.1:0", "name": "reliability", "workers": 1},
            "admin": {
                "socket": str(self.admin_socket),
                "group": grp.getgrgid(os.getgid()).gr_name,
            },
            "state_dir": str(self.state_dir),
            "models": {"default": "echo"},
            "limits": {"requests_per_minute": None, "concurrent_requests": None},
            "logging": {"level": "warning", "format": "json"},
        }
        for section, values in overrides.items():
            if isinstance(values, dict):
                self.raw.setdefault(section, {}).update(values)
            else:
                self.raw[section] = values
        self.write_config()
        self.notify = Notify(self.sock_dir / "notify.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self._channels: list[grpc.Channel] = []

    # -- lifecycle ----------------------------------------------------------------------

    def write_config(self, text: str | None = None) -> None:
        """Write self.raw (or `text` verbatim, e.g. a broken file) as the config file."""
        self.config_path.write_text(json.dumps(self.raw) if text is None else text)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60) -> DaemonProcess:
        """Start the process and return once it has sent READY=1."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.close_channels()
        mark = self.notify.mark()
        if self.fake_models:
            argv = [sys.executable, "-m", "tests.reliability._procs"]
        else:
            argv = [str(BIN / "vibectld")]
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path)}
        env.pop("WATCHDOG_USEC", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*argv, "--config", str(self.config_path)],
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.notify.wait(ready, 0.5, after=mark)
                break
            except TimeoutError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(
                        f"vibectld did not become ready:\n{self.log_tail()}"
                    ) from None
        listen = self.admin("status")["listeners"]["grpc"]
        self.port = int(str(listen).rpartition(":")[2])
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9 and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; kill -9 (and fail) if it does not exit in time."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"vibectld ignored SIGTERM for {timeout} s") from None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    def close(self) -> None:
        self.close_channels()
        self.kill()
        self.notify.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            print(f"--- vibectld log ---\n{self.log_tail()}")
        self.close()

    # -- talking to it ------------------------------------------------------------------

    def admin(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        with AdminClient(self.admin_socket, timeout=30) as client:
            return client.call(op, args or {})

    def issue(self, name: str, **args: Any) -> str:
        """Issue a client; its secret."""
        return secret_of(str(self.admin("issue_client", {"name": name, **args})["url"]))

    def channel(self) -> grpc.Channel:
        ca = (self.state_dir / "tls" / "ca.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        channel = grpc.secure_channel(f"127.0.0.1:{self.port}", creds)
        self._channels.append(channel)
        return channel

    def stub(self) -> pb_grpc.VibectlLLMProxyStub:
        return pb_grpc.VibectlLLMProxyStub(self.channel())


def _main() -> None:
    """vibectld with the test models registered (what the in-process fixture does)."""
    from llm.plugins import pm

    from tests import fake_models
    from vibectld.cli import main

    if not pm.is_registered(fake_models):
        pm.register(fake_models, name="vibectld-test-models")
    main()


if __name__ == "__main__":
    _main()
