"""HAProxy as the TCP load balancer in front of several vibectld nodes.

    def test_cluster(haproxy: Callable[[list[int]], HAProxy]) -> None:
        lb = haproxy([port_a, port_b])      # listening on 127.0.0.1:lb.port
        lb.wait_status({port_a: "UP", port_b: "UP"})
        lb.set_backends([port_a, port_c])   # rewrite the config, reload gracefully
        lb.stop()

HAProxy (Debian's package, installed by scripts/system-deps) runs in TCP mode
(`mode tcp`, `balance roundrobin`) with a health check every 500 ms on each backend, so
a node that dies is taken out of rotation within about a second; until then a connection
refused by it is retried on another (`option redispatch`). It runs in the foreground in
master-worker mode (`-W -db`), as `nobody` when the tests run as root, in a temporary
directory. A reload is the master's: it re-reads the config and starts a new worker with
`-sf <old worker>`, which lets the old one finish the connections it carries (at most
`hard-stop-after`, 5 s); the master CLI socket (`-S`) tells when the new worker is in
place and lets a test read each backend's health state.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from bench.postgres import free_port, give_away, private_dir, unprivileged

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"

_CONFIG = """\
global
    maxconn 4096
    # An old worker still carrying connections after a reload is stopped after this.
    hard-stop-after 5s

defaults
    mode tcp
    timeout connect 1s
    # gRPC streams and idle keepalive connections stay open for a long time.
    timeout client 1h
    timeout server 1h
    # A connection a node refuses goes to another node, before health checks notice.
    option redispatch
    retries 2

frontend vibectld
    bind 127.0.0.1:{port}
    default_backend nodes

backend nodes
    balance roundrobin
{servers}
"""


class HAProxyError(RuntimeError):
    pass


class HAProxy:
    """One HAProxy master process and its worker, in a directory of its own."""

    def __init__(self, backends: Sequence[int]) -> None:
        self.dir = private_dir("vibectld-lb-")
        self.config = self.dir / "haproxy.cfg"
        self.master_socket = self.dir / "master.sock"
        self.log_path = self.dir / "haproxy.log"
        self.port = 0
        self.backends: list[int] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._initial = list(backends)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> HAProxy:
        if not Path(HAPROXY).exists():
            raise FileNotFoundError("haproxy is not installed (scripts/system-deps installs it)")
        for attempt in range(3):
            self.port = free_port()
            self._write_config(self._initial)
            try:
                self._spawn()
                return self
            except HAProxyError:
                # The port we probed can be taken before haproxy binds it; another one.
                if attempt == 2 or "cannot bind" not in self.log_tail():
                    raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                [HAPROXY, "-W", "-db", "-S", str(self.master_socket), "-f", str(self.config)],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                **unprivileged(),
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise HAProxyError(f"haproxy exited {self._proc.returncode}:\n{self.log_tail()}")
            if self._accepting() and self._worker_pid() is not None:
                return
            time.sleep(0.02)
        self.stop()
        raise HAProxyError(f"haproxy did not start within 10 s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the master, which stops the worker; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def set_backends(self, ports: Sequence[int], timeout: float = 10) -> None:
        """Rewrite the config with these backends and reload; returns once the new
        worker serves (connections already open finish on the old one)."""
        assert self._proc is not None, "start() first"
        old_worker = self._worker_pid()
        self._write_config(ports)
        check = subprocess.run(
            [HAPROXY, "-c", "-q", "-f", str(self.config)],
            capture_output=True,
            text=True,
            check=False,
            **unprivileged(),
        )
        if check.returncode != 0:
            raise HAProxyError(f"the new haproxy config is invalid: {check.stderr}")
        self._proc.send_signal(signal.SIGUSR2)  # the master re-reads the config
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            worker = self._worker_pid()
            if worker is not None and worker != old_worker:
                return
            time.sleep(0.02)
        raise HAProxyError(f"haproxy did not reload within {timeout} s:\n{self.log_tail()}")

    def _write_config(self, ports: Sequence[int]) -> None:
        self.backends = list(ports)
        servers = "\n".join(
            f"    server p{p} 127.0.0.1:{p} check inter 500ms fall 2 rise 1" for p in ports
        )
        text = _CONFIG.format(port=self.port, servers=servers)
        # The master re-reads the file on reload: replace it whole, never half-written.
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        give_away(tmp)
        tmp.replace(self.config)

    # -- what a test can ask ---------------------------------------------------------

    def status(self) -> dict[int, str]:
        """Each backend port's health as the current worker sees it: UP, DOWN, …"""
        out = self._master_command("@1 show stat")
        rows = csv.DictReader(line.removeprefix("# ") for line in out.splitlines() if line)
        return {
            int(row["svname"].removeprefix("p")): row["status"].split()[0]
            for row in rows
            if row.get("pxname") == "nodes" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_status(self, expected: Mapping[int, str], timeout: float = 10) -> None:
        """Wait until every named backend has the expected state (e.g. {port: "DOWN"})."""
        deadline = time.monotonic() + timeout
        seen: dict[int, str] = {}
        while time.monotonic() < deadline:
            seen = self.status()
            if all(seen.get(port) == state for port, state in expected.items()):
                return
            time.sleep(0.05)
        raise HAProxyError(f"backends are {seen}, expected {dict(expected)} after {timeout} s")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _worker_pid(self) -> int | None:
        """The current worker's pid from the master CLI's `show proc`."""
        try:
            out = self._master_command("show proc")
        except OSError:
            return None  # the master is re-executing itself during a reload
        section = ""
        for line in out.splitlines():
            if line.startswith("#"):
                section = line
                continue
            fields = line.split()
            if section == "# workers" and len(fields) > 1 and fields[1] == "worker":
                return int(fields[0])
        return None

    def _master_command(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.master_socket))
            s.sendall(command.encode() + b"\n")
            s.shutdown(socket.SHUT_WR)  # one command: the master answers, then closes
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")


@pytest.fixture
def haproxy() -> Iterator[Callable[[Sequence[int]], HAProxy]]:
    """Start HAProxy in front of the given backend ports; each one is removed after the test."""
    started: list[HAProxy] = []

    def start(backends: Sequence[int]) -> HAProxy:
        if not Path(HAPROXY).exists():
            reason = "haproxy is not installed (scripts/system-deps installs it as root)"
            if os.environ.get("CI"):
                pytest.fail(f"CI must run the load balancer tests, but {reason}")
            pytest.skip(reason)
        lb = HAProxy(backends)
        started.append(lb)
        return lb.start()

    try:
        yield start
    finally:
        for lb in started:
            with contextlib.suppress(Exception):
                lb.remove()
