"""Starting and stopping the servers under test: vibectld and the floor.

Every child runs in its own session (so a Ctrl-C at the terminal reaches only
the orchestrator, which then stops them in order) and, on Linux, is told to
receive SIGTERM if the orchestrator dies without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import yaml

from vibectl.proxy_url import parse as parse_url

REPO = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1
# vibectl-admin's exit status when nothing answers on the socket (yet).
EX_UNAVAILABLE = 69


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

    def stop_all(self, grace: float = 10.0) -> None:
        for _, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for _, proc in reversed(self.children):
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        self.children.clear()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Vibectld:
    """A vibectld subprocess with an issued client, configured for benchmarking."""

    def __init__(self, procs: Processes, workdir: Path, sockdir: Path) -> None:
        self.procs = procs
        self.workdir = workdir
        self.socket = sockdir / "admin.sock"
        self.state_dir = workdir / "state"
        self.config_path = workdir / "vibectld.yaml"
        self.log_path = workdir / "vibectld.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.secret = ""

    def write_config(self) -> None:
        config = {
            "server": {"listen": "127.0.0.1:0", "name": "bench", "shutdown_grace_seconds": 1},
            "admin": {"socket": str(self.socket), "group": grp.getgrgid(os.getgid()).gr_name},
            "state_dir": str(self.state_dir),
            "models": {"default": "echo"},
            # No limits: they would only refuse the load we are measuring.
            "limits": {"requests_per_minute": None, "concurrent_requests": None},
            # A realistic production setting: every request is logged, as JSON, to a file.
            "logging": {"level": "info", "format": "json"},
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def admin(self, *args: str, timeout: float = 10.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("vibectl-admin"), "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 60.0) -> None:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        with self.log_path.open("wb") as log:
            self.proc = self.procs.start(
                "vibectld",
                [tool("vibectld"), "--config", str(self.config_path)],
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"vibectld exited with {self.proc.returncode} while starting; its log "
                    f"({self.log_path}) ends:\n{_tail(self.log_path)}"
                )
            status = self.admin("--json", "status")
            if status.returncode == 0:
                break
            if status.returncode != EX_UNAVAILABLE:
                raise BenchError(
                    f"vibectl-admin status failed: {status.stderr.strip()}; vibectld's log "
                    f"({self.log_path}) ends:\n{_tail(self.log_path, 3)}"
                )
            if time.monotonic() > deadline:
                raise BenchError(f"vibectld did not answer on {self.socket}: {status.stderr}")
            time.sleep(0.1)
        listener = json.loads(status.stdout)["listeners"]["grpc"]
        self.port = int(listener.rpartition(":")[2])
        issued = self.admin("issue-client", "bench")
        if issued.returncode != 0:
            raise BenchError(f"vibectl-admin issue-client failed: {issued.stderr.strip()}")
        secret = parse_url(issued.stdout.strip()).secret
        if not secret:
            raise BenchError("the issued URL carries no secret")
        self.secret = secret

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def ca_path(self) -> Path:
        return self.state_dir / "tls" / "ca.pem"

    def chain_for_floor(self) -> tuple[Path, Path]:
        """vibectld's own certificate chain (server.pem + ca.pem, as it serves it) and key."""
        tls = self.state_dir / "tls"
        chain = self.workdir / "floor-chain.pem"
        chain.write_bytes((tls / "server.pem").read_bytes() + (tls / "ca.pem").read_bytes())
        return chain, tls / "server.key"


class Floor:
    """The bench.floor_server subprocess."""

    def __init__(self, procs: Processes) -> None:
        self.procs = procs
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, cert: Path, key: Path, timeout: float = 30.0) -> None:
        self.proc = self.procs.start(
            "floor",
            [
                sys.executable,
                "-m",
                "bench.floor_server",
                "--port",
                "0",
                "--cert",
                str(cert),
                "--key",
                str(key),
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode().strip() if ready else ""
        if not line.isdigit():
            raise BenchError(f"the floor server did not start (said {line!r})")
        self.port = int(line)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid
