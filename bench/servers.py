"""Starting and stopping the processes under test: vibectld, the floor, the fake provider.

Every child runs in its own session (so a Ctrl-C at the terminal reaches only
the orchestrator, which then stops them in order) and, on Linux, is told to
receive SIGTERM if the orchestrator dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from vibectl.proxy_url import parse as parse_url
from vibectld.admin.client import AdminClient, AdminClientError, DaemonUnreachable

REPO = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def _die_with_parent() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(libc_name, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def tool(name: str) -> str:
    """A console script of this virtualenv (beside sys.executable), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"cannot find {name}; run scripts/bootstrap first")
    return found


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without systemd's variables, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(extra)
    return env


def rss_kib(pid: int) -> int:
    """The resident set size of a process, in KiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


class Processes:
    """The children this run started; stop_all() ends each of them, by pid."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
            # preexec_fn is safe here: the orchestrator runs no threads.
            preexec_fn=_die_with_parent,
        )
        self.children.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM one child, SIGKILL it after `grace` seconds, and forget it."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _reap(proc, grace)
        self.children = [(n, p) for n, p in self.children if p is not proc]

    def stop_all(self, grace: float = 10.0) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in reversed(self.children):
            _reap(proc, max(deadline - time.monotonic(), 0.1))
        self.children.clear()


def _reap(proc: subprocess.Popen[bytes], grace: float) -> None:
    """Wait up to `grace` seconds for a signalled child, then SIGKILL it; close its pipes."""
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_for(self, line: str, deadline: float) -> bool:
        """Read notifications until one carries `line` (True) or the deadline passes."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready and line in self.sock.recv(65536).decode(errors="replace").splitlines():
                return True

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Vibectld:
    """A vibectld subprocess configured for benchmarking, with an admin client."""

    def __init__(
        self,
        procs: Processes,
        workdir: Path,
        sockdir: Path,
        *,
        name: str = "vibectld",
        models: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        workers: int | None = None,
    ) -> None:
        self.procs = procs
        self.name = name
        # server.workers; None leaves the key out (the daemon's default).
        self.workers = workers
        self.workdir = workdir / name
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths are limited to 107 bytes: keep them in the short sockdir.
        self.socket = sockdir / f"{name}.sock"
        self.notify_path = sockdir / f"{name}.notify"
        self.state_dir = self.workdir / "state"
        self.config_path = self.workdir / "vibectld.yaml"
        self.log_path = self.workdir / "vibectld.log"
        self.models = models or {"default": "echo"}
        # No limits by default: they would only refuse the load we are measuring.
        self.limits = limits or {"requests_per_minute": None, "concurrent_requests": None}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.secret = ""
        # Seconds from the start of the process to READY=1 (start(notify=True) only).
        self.ready_s: float | None = None

    def write_config(self) -> None:
        server: dict[str, Any] = {"listen": "127.0.0.1:0", "name": "bench"}
        server["shutdown_grace_seconds"] = 1
        if self.workers is not None:
            server["workers"] = self.workers
        config = {
            "server": server,
            "admin": {"socket": str(self.socket), "group": grp.getgrgid(os.getgid()).gr_name},
            "state_dir": str(self.state_dir),
            "models": self.models,
            "limits": self.limits,
            # A realistic production setting: every request is logged, as JSON, to a file.
            "logging": {"level": "info", "format": "json"},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def admin(self, timeout: float = 60.0) -> AdminClient:
        """A new client of the admin socket (the in-tree one vibectl-admin uses)."""
        return AdminClient(self.socket, timeout=timeout)

    def start(self, *, timeout: float = 120.0, notify: bool = False, issue: bool = True) -> None:
        """Start and wait until the admin socket answers; with `notify`, time READY=1."""
        self.write_config()
        env = clean_env()
        notifier = NotifySocket(self.notify_path) if notify else None
        if notifier is not None:
            env["NOTIFY_SOCKET"] = str(self.notify_path)
        started = time.monotonic()
        deadline = started + timeout
        try:
            with self.log_path.open("ab") as log:
                self.proc = self.procs.start(
                    self.name,
                    [tool("vibectld"), "--config", str(self.config_path)],
                    stdout=log,
                    stderr=log,
                    env=env,
                )
            if notifier is not None:
                if not notifier.wait_for("READY=1", deadline):
                    self._fail("did not send READY=1")
                self.ready_s = time.monotonic() - started
        finally:
            if notifier is not None:
                notifier.close()
        status = self._wait_for_admin(deadline)
        listener = status["listeners"]["grpc"]
        self.port = int(listener.rpartition(":")[2])
        if issue:
            self.secret = self.issue("bench")

    def _fail(self, what: str) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            what = f"exited with {self.proc.returncode}"
        raise BenchError(
            f"{self.name} {what} while starting; its log ({self.log_path}) ends:\n"
            f"{_tail(self.log_path)}"
        )

    def _wait_for_admin(self, deadline: float) -> dict[str, Any]:
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                self._fail("exited")
            try:
                with self.admin(timeout=5) as admin:
                    return admin.call("status")
            except DaemonUnreachable as e:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not answer on {self.socket}: {e}") from None
            except AdminClientError as e:
                raise BenchError(f"{self.name}: admin status failed: {e.message}") from None
            time.sleep(0.05)

    def issue(self, name: str, **args: Any) -> str:
        """Issue a client and return its secret."""
        try:
            with self.admin() as admin:
                result = admin.call("issue_client", {"name": name, **args})
        except AdminClientError as e:
            raise BenchError(f"issue-client {name} failed: {e.message}") from None
        secret = parse_url(result["url"]).secret
        if not secret:
            raise BenchError("the issued URL carries no secret")
        return secret

    def issue_url(self, name: str) -> str:
        with self.admin() as admin:
            return str(admin.call("issue_client", {"name": name})["url"])

    def stop(self) -> None:
        if self.proc is not None:
            self.procs.stop(self.proc)
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    @property
    def registry_path(self) -> Path:
        return self.state_dir / "registry.db"

    def chain_for_floor(self) -> tuple[Path, Path]:
        """vibectld's own certificate chain (server.pem + ca.pem, as it serves it) and key."""
        tls = self.state_dir / "tls"
        chain = self.workdir / "floor-chain.pem"
        chain.write_bytes((tls / "server.pem").read_bytes() + (tls / "ca.pem").read_bytes())
        return chain, tls / "server.key"


def _start_printing_port(
    procs: Processes, name: str, argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a child that prints the port it bound on its first line; (child, port)."""
    proc = procs.start(name, argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line.isdigit():
        raise BenchError(f"the {name} did not start (said {line!r})")
    return proc, int(line)


class Floor:
    """The bench.floor_server subprocess."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, cert: Path, key: Path, timeout: float = 30.0, *extra: str) -> None:
        """`extra`: more bench.floor_server arguments (the paced floor's)."""
        argv = [sys.executable, "-m", "bench.floor_server", "--port", "0"]
        argv += ["--cert", str(cert), "--key", str(key), *extra]
        self.proc, self.port = _start_printing_port(self.procs, "floor server", argv, timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


class FakeProvider:
    """The bench.fake_openai subprocess: an OpenAI-compatible endpoint with fixed latency."""

    def __init__(
        self,
        procs: Processes,
        latency_ms: float,
        *,
        chunk_delay_ms: float = 0.0,
        stream: tuple[str, int] | None = None,
        module: str = "bench.fake_openai",
    ) -> None:
        self.procs = procs
        # bench.fake_openai, or bench.fake_paced for thousands of paced streams.
        self.module = module
        self.latency_ms = latency_ms
        self.chunk_delay_ms = chunk_delay_ms
        # (text, count): every streamed reply is `count` chunks of `text`.
        self.stream = stream
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 30.0) -> None:
        argv = [sys.executable, "-m", self.module, "--port", "0"]
        argv += ["--latency-ms", f"{self.latency_ms:g}"]
        argv += ["--chunk-delay-ms", f"{self.chunk_delay_ms:g}"]
        if self.stream is not None:
            argv += ["--stream-chunk", self.stream[0], "--stream-count", str(self.stream[1])]
        self.proc, self.port = _start_printing_port(self.procs, "fake provider", argv, timeout)

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid
