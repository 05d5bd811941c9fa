"""Boot a copy of the cached root filesystem with ``systemd-nspawn --boot`` and run
commands inside it through ``nsenter``.

This machine's PID 1 is not systemd, so there is no systemd-machined to register
with and no unit to move into: ``--register=no --keep-unit``. ``machinectl shell``
is therefore unavailable too; commands enter the container's namespaces with
``nsenter`` on its init, found as the child of the nspawn process. The container
shares the host's network namespace, so the daemon inside listens on the host's
loopback and the test reaches it on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

# The environment commands inside see: nothing of the host's (no venv, no CI vars).
INSIDE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "DEBIAN_FRONTEND": "noninteractive",
}


PREFIX = "systest-"


class ContainerError(RuntimeError):
    pass


def reap_stale(workdir: Path) -> None:
    """Remove copies left by test runs that died without tearing down: their test
    process is gone and no systemd-nspawn runs on them any more."""
    try:
        entries = list(workdir.glob(f"{PREFIX}*"))
    except OSError:
        return
    if not entries:
        return
    in_use = ""
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes()
            if b"systemd-nspawn" in cmdline:
                in_use += cmdline.decode(errors="replace")
    for entry in entries:
        match = re.match(rf"{PREFIX}[a-z]+-(\d+)-", entry.name)
        if not match or Path(f"/proc/{match.group(1)}").exists() or str(entry) in in_use:
            continue
        shutil.rmtree(entry, ignore_errors=True)


@dataclass
class Result:
    cmd: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        return (
            f"$ {shlex.join(self.cmd)}\n(exit {self.returncode})\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


class Container:
    """A booted copy of `rootfs`; a context manager that always tears it down."""

    def __init__(self, rootfs: Path, label: str, workdir: Path = Path("/var/tmp")) -> None:
        """`label` names the machine (systest-<label>-<pid>) and its copy in `workdir`."""
        reap_stale(workdir)
        self.rootfs = rootfs
        self.name = f"{PREFIX}{label}-{os.getpid()}"
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=workdir))
        self.root = self.base / "root"
        self.console_log = self.base / "console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid: int | None = None

    # -- life cycle -------------------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def copy_rootfs(self) -> None:
        # --reflink=auto: instant on btrfs/xfs, a plain copy (~2s) on ext4.
        subprocess.run(
            ["cp", "-a", "--reflink=auto", str(self.rootfs), str(self.root)],
            check=True,
            timeout=300,
        )

    def boot(self, timeout: float = 90) -> None:
        if not self.root.exists():
            self.copy_rootfs()
        self.launch()
        self.wait_booted(timeout)

    def launch(self) -> None:
        """Start systemd-nspawn on the copy, without waiting for the boot.

        Call it from the thread that outlives the container (the main thread): the
        parent-death signal below is sent when the *thread* that started nspawn exits,
        so a worker thread's end would power the container off.
        """
        with self.console_log.open("wb") as console:
            self.nspawn = subprocess.Popen(
                [
                    # Should this process die without tearing down (SIGKILL, a CI time-out),
                    # nspawn gets SIGTERM and powers the container off.
                    "setpriv",
                    "--pdeathsig=TERM",
                    "--",
                    "systemd-nspawn",
                    "--boot",
                    "--register=no",
                    "--keep-unit",
                    "--console=read-only",
                    f"--machine={self.name}",
                    f"--directory={self.root}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_booted(self, timeout: float = 90) -> None:
        """Wait until the launched container's systemd reports running (or degraded)."""
        deadline = time.monotonic() + timeout
        self.init_pid = self._wait_for_init(deadline)
        self._wait_until_running(deadline)

    def _wait_for_init(self, deadline: float) -> int:
        assert self.nspawn is not None
        children = Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children")
        while time.monotonic() < deadline:
            if self.nspawn.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited with {self.nspawn.returncode} before the "
                    f"container booted\n{self.console()}"
                )
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids:
                    pid = int(pids[0])
                    # The child is nspawn's own fork until it execs the container's init.
                    if Path(f"/proc/{pid}/exe").resolve().name == "systemd":
                        return pid
            time.sleep(0.1)
        raise ContainerError(f"no init process in the container\n{self.console()}")

    def _wait_until_running(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            result = self.run(["systemctl", "is-system-running", "--wait"], timeout=left)
            state = result.stdout.strip()
            if state in ("running", "degraded"):
                if state == "degraded":
                    failed = self.run(["systemctl", "--failed", "--no-legend"]).stdout
                    print(f"container {self.name} is degraded:\n{failed}")
                return
            # "offline": systemctl cannot reach the manager yet, which happens right after
            # init execs systemd, before its socket exists (seen booting two at once).
            if state not in ("initializing", "starting", "offline", ""):
                break
            if self.nspawn is not None and self.nspawn.poll() is not None:
                break  # the container is gone: no point waiting for the deadline
            time.sleep(0.5)
        raise ContainerError(
            f"the container did not finish booting (state {state!r})\n{self.console()}"
        )

    def stop(self, timeout: float = 30) -> None:
        """Power off cleanly (SIGTERM makes nspawn ask init to halt); SIGKILL if stuck."""
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                # Killing the container's init takes the whole PID namespace with it.
                for pid in (self.init_pid, self.nspawn.pid):
                    if pid is not None:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.nspawn.wait(10)
        self.nspawn = None
        self.init_pid = None

    def destroy(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def console(self, lines: int = 60) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console output)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"--- last {lines} lines of the container's console ---\n{tail}"

    # -- inside -----------------------------------------------------------------------

    def run(
        self,
        cmd: list[str],
        timeout: float = 60,
        check: bool = False,
        input: str | None = None,
    ) -> Result:
        """Run `cmd` as root inside the container's namespaces, with a clean environment."""
        if self.init_pid is None:
            raise ContainerError("the container is not running")
        full = [
            "nsenter",
            f"--target={self.init_pid}",
            "--mount",
            "--uts",
            "--ipc",
            "--net",
            "--pid",
            # The root and working directory of the container's init (its /). Not
            # --wd=/: nsenter opens a given path in the caller's namespace, i.e. the host's /.
            "--root",
            "--wd",
            "--",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in INSIDE_ENV.items()),
            *cmd,
        ]
        try:
            proc = subprocess.run(
                full,
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise ContainerError(
                f"timed out after {timeout:.0f}s inside {self.name}: {shlex.join(cmd)}\n"
                f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}"
            ) from None
        result = Result(cmd, proc.returncode, proc.stdout, proc.stderr)
        if check and not result.ok:
            raise ContainerError(result.describe())
        return result

    def sh(self, script: str, timeout: float = 60, check: bool = False) -> Result:
        return self.run(["sh", "-ec", script], timeout=timeout, check=check)

    def path(self, inside: str) -> Path:
        """The host path of a file inside the container (its root is a directory here)."""
        return self.root / inside.lstrip("/")

    def journal(self, unit: str, lines: int = 100) -> str:
        status = self.run(["systemctl", "status", "--no-pager", "--lines=0", unit], timeout=20)
        journal = self.run(
            ["journalctl", "--no-pager", "-u", unit, "-n", str(lines), "-o", "short-precise"],
            timeout=30,
        )
        return (
            f"--- systemctl status {unit} ---\n{status.stdout}{status.stderr}"
            f"--- journalctl -u {unit} -n {lines} ---\n{journal.stdout}{journal.stderr}"
        )
