"""The .deb under systemd with `server.workers: auto`: every core serves, one unit.

A fresh Debian 12 copy gets the real package and the llm-echo model (as in
test_systemd.py), and its config sets `server.workers: auto` — as many serving
processes as the CPUs the unit may use (the container's; the count is printed with
the results). Then:

- `systemctl start` returns (Type=notify: once READY=1 is sent) with the unit active,
  `vibectl-admin status --json` listing one worker per CPU, each a child of the main
  process, and at once every worker serves a call from the host: connections are opened
  until each worker has accepted one (the worker holding a connection's server side is
  read from the container's /proc), and a call is made on each;
- `systemctl reload` applies a changed config in every worker (a new model alias is
  visible through a connection to each), and the worker pids do not change;
- a worker killed with SIGKILL is replaced by the main process: the unit stays active
  with the same MainPID and no restart, and every worker (the new one too) serves;
- the unit's memory and task counts with N workers are well inside its MemoryMax= and
  TasksMax= (printed, per process: the caps grow with the CPU count under auto, and the
  unit's comment sizes them from these numbers);
- `systemd-analyze security` stays at or below 1.5;
- `systemctl stop` is clean: Result=success, well before TimeoutStopSec=, and no process
  of the daemon is left.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.system import packages
from tests.system.conftest import NOTES, booted, timed
from tests.system.container import Container
from tests.system.test_systemd import (
    CONFIG,
    EXPOSURE_LIMIT,
    STAGING,
    HostClient,
    config_yaml,
    ensure_echo_model,
    free_port,
    issue,
    ok,
    show,
    systemctl,
    unit_state,
    write_config,
)
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.system, pytest.mark.timeout(1800)]

WORKERS = "  workers: auto\n"

# Run inside the container: {client port: pid} for the established connections accepted
# on a port by the given processes. The container shares the host's network namespace
# (so /proc/net/tcp is the host's table), but only its own /proc shows whose socket it is.
OWNERS = r"""
import json, os, sys
port, pids = int(sys.argv[1]), [int(p) for p in sys.argv[2:]]
conns = {}
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    with open(table) as f:
        for line in list(f)[1:]:
            c = line.split()
            if c[3] == "01" and int(c[1].rpartition(":")[2], 16) == port:
                conns[int(c[9])] = int(c[2].rpartition(":")[2], 16)
owner = {}
for pid in pids:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in conns:
            owner[conns[int(target[8:-1])]] = pid
print(json.dumps(owner))
"""

# PSS (KiB: shared pages split between the processes that map them, as the cgroup
# counts them once) and thread count of each given process.
PROCESS_USE = r"""
import sys
for pid in sys.argv[1:]:
    pss = next(
        line.split()[1]
        for line in open(f"/proc/{pid}/smaps_rollup").read().splitlines()
        if line.startswith("Pss:")
    )
    threads = next(
        line.split()[1]
        for line in open(f"/proc/{pid}/status").read().splitlines()
        if line.startswith("Threads:")
    )
    print(pid, pss, threads)
"""

# Every process of the daemon, by its command line.
DAEMON_PROCESSES = r"""
import os
for pid in filter(str.isdigit, os.listdir("/proc")):
    if int(pid) == os.getpid():
        continue
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        continue
    if any(b"vibectld" in part for part in cmd[:3]) and b"vibectl-admin" not in cmd[0]:
        print(pid, b" ".join(cmd).decode(errors="replace"))
"""


def note(line: str) -> None:
    NOTES.append(f"workers: {line}")


def python(box: Container, script: str, *args: str) -> str:
    return ok(box.run(["/usr/bin/python3.11", "-c", script, *args], timeout=30))


def children(box: Container, pid: int) -> set[int]:
    out = box.sh(f"cat /proc/{pid}/task/*/children").stdout
    return {int(x) for x in out.split()}


def status(box: Container) -> dict[str, object]:
    doc: dict[str, object] = json.loads(
        ok(box.run(["vibectl-admin", "--json", "status"], timeout=30))
    )
    return doc


def status_workers(box: Container) -> list[dict[str, object]]:
    workers = status(box).get("workers")
    assert isinstance(workers, list), f"status has no workers list: {workers!r}"
    return workers


class PlacedClient:
    """The host client's calls, each on a connection of its own, placed on a known worker."""

    def __init__(self, box: Container, client: HostClient, main: int, workers: set[int]) -> None:
        self.box = box
        self.client = client
        self.main = main
        self.workers = workers

    def owners(self) -> dict[int, int]:
        out = python(self.box, OWNERS, str(self.client.url.port), *map(str, self.workers))
        return {int(k): int(v) for k, v in json.loads(out).items()}

    def channel(self) -> tuple[grpc.Channel, int]:
        """A new channel and the worker that accepted its connection."""
        before = set(self.owners())
        creds = grpc.ssl_channel_credentials(root_certificates=self.client.ca_pem)
        options = [
            ("grpc.ssl_target_name_override", self.client.url.host),
            # Channels with equal arguments would otherwise share one connection.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        channel = grpc.secure_channel(f"127.0.0.1:{self.client.url.port}", creds, options)
        grpc.channel_ready_future(channel).result(timeout=10)
        deadline = time.monotonic() + 5
        while True:
            new = {port: pid for port, pid in self.owners().items() if port not in before}
            if len(new) == 1:
                return channel, new.popitem()[1]
            assert time.monotonic() < deadline, f"new connections {new}"
            time.sleep(0.1)

    def one_per_worker(self, tries: int = 60) -> dict[int, grpc.Channel]:
        placed: dict[int, grpc.Channel] = {}
        for _ in range(tries):
            channel, pid = self.channel()
            if pid in placed:
                channel.close()
            else:
                placed[pid] = channel
            if set(placed) == self.workers:
                return placed
        for channel in placed.values():
            channel.close()
        raise AssertionError(f"in {tries} connections only workers {set(placed)} accepted one")

    def info(self, channel: grpc.Channel) -> pb.GetServerInfoResponse:
        stub = pb_grpc.VibectlLLMProxyStub(channel)
        meta = [("authorization", f"Bearer {self.client.url.secret}")]
        reply: pb.GetServerInfoResponse = stub.GetServerInfo(
            pb.GetServerInfoRequest(), metadata=meta, timeout=30
        )
        return reply

    def served(self, channel: grpc.Channel, prompt: str) -> None:
        stub = pb_grpc.VibectlLLMProxyStub(channel)
        meta = [("authorization", f"Bearer {self.client.url.secret}")]
        reply: pb.ExecuteResponse = stub.Execute(
            pb.ExecuteRequest(user_fragments=[prompt]), metadata=meta, timeout=30
        )
        assert reply.WhichOneof("result") == "success", reply
        assert prompt in reply.success.response_text


class State:
    port: int = 0
    cpus: int = 0
    main: int = 0
    workers: set[int]
    placed: PlacedClient


@pytest.fixture(scope="class")
def state() -> State:
    return State()


@pytest.fixture(scope="class")
def workers_box(cached_rootfs: Path) -> Iterator[Container]:
    with booted(cached_rootfs, "workers") as box:
        yield box


class TestWorkersDeb:
    def test_install_and_configure_workers_auto(
        self,
        workers_box: Container,
        built_packages: packages.Packages,
        echo_wheel: Path,
        state: State,
    ) -> None:
        deb = f"{STAGING}/{built_packages.deb.name}"
        shutil.copy(built_packages.deb, workers_box.path(deb))
        with timed("workers: apt-get install ./vibectld_*.deb"):
            ok(workers_box.run(["apt-get", "install", "-y", "--no-install-recommends", deb], 300))
        ensure_echo_model(workers_box, echo_wheel)
        state.port = free_port()
        write_config(workers_box, config_yaml(state.port, extra=WORKERS))
        ok(workers_box.run(["vibectld", "--check-config", "--config", CONFIG]))
        state.cpus = int(ok(workers_box.run(["nproc"])).strip())
        note(f"the container may use {state.cpus} CPUs (nproc)")

    def test_start_is_ready_when_every_worker_serves(
        self, workers_box: Container, state: State
    ) -> None:
        with timed(f"workers: systemctl start vibectld (workers: auto, {state.cpus} CPUs)"):
            started = time.monotonic()
            ok(systemctl(workers_box, "start", "vibectld"))
            start_s = time.monotonic() - started
        assert unit_state(workers_box) == "active"
        state.main = int(show(workers_box, "MainPID"))
        listed = status_workers(workers_box)
        state.workers = children(workers_box, state.main)
        pids = {int(str(w["pid"])) for w in listed}
        note(
            f"start took {start_s:.1f} s; status lists {len(listed)} workers: {json.dumps(listed)}"
        )
        assert len(listed) == max(state.cpus, 1)
        assert all(w["state"] == "serving" for w in listed), listed
        status_text = show(workers_box, "StatusText")
        note(f"STATUS={status_text!r}; watchdog {show(workers_box, 'WatchdogUSec')}")
        assert pids == state.workers, f"status {pids}, children of {state.main}: {state.workers}"

        # At once: a call served through a connection accepted by each worker.
        client = HostClient(issue(workers_box, "many-cores"))
        state.placed = PlacedClient(workers_box, client, state.main, state.workers)
        placed = state.placed.one_per_worker()
        try:
            for pid, channel in placed.items():
                state.placed.served(channel, f"hello worker {pid}")
        finally:
            for channel in placed.values():
                channel.close()
        note(f"right after start, each of workers {sorted(placed)} served a call")

    def test_reload_reaches_every_worker(self, workers_box: Container, state: State) -> None:
        aliases = "  aliases:\n    after-reload: echo\n"
        text = config_yaml(state.port, extra=WORKERS).replace(
            "  default: echo\n", "  default: echo\n" + aliases
        )
        write_config(workers_box, text)
        with timed("workers: systemctl reload vibectld"):
            ok(systemctl(workers_box, "reload", "vibectld"))
        assert unit_state(workers_box) == "active"
        assert int(show(workers_box, "MainPID")) == state.main
        assert children(workers_box, state.main) == state.workers, "a reload restarted workers"
        placed = state.placed.one_per_worker()
        try:
            seen = {pid: dict(state.placed.info(ch).model_aliases) for pid, ch in placed.items()}
        finally:
            for channel in placed.values():
                channel.close()
        assert all(a.get("after-reload") == "echo" for a in seen.values()), seen

    def test_a_killed_worker_is_replaced_inside_the_unit(
        self, workers_box: Container, state: State
    ) -> None:
        """The main process replaces a worker killed with SIGKILL; systemd sees no failure
        (the unit stays active, its MainPID and NRestarts unchanged)."""
        victim = min(state.workers)
        killed = time.monotonic()
        ok(workers_box.sh(f"kill -KILL {victim}"))
        deadline = killed + 60
        while True:
            listed = status_workers(workers_box)
            serving = {int(str(w["pid"])) for w in listed if w["state"] == "serving"}
            if len(serving) == len(state.workers) and victim not in serving:
                break
            assert time.monotonic() < deadline, f"no replacement for {victim}: {listed}"
            time.sleep(0.2)
        replaced_s = time.monotonic() - killed
        (new,) = serving - state.workers
        assert unit_state(workers_box) == "active"
        assert int(show(workers_box, "MainPID")) == state.main
        assert show(workers_box, "NRestarts") == "0"
        state.workers = children(workers_box, state.main)
        assert state.workers == serving, (state.workers, listed)
        state.placed.workers = state.workers
        placed = state.placed.one_per_worker()
        try:
            for pid, channel in placed.items():
                state.placed.served(channel, f"hello again worker {pid}")
        finally:
            for channel in placed.values():
                channel.close()
        note(
            f"worker {victim} killed with SIGKILL: replaced by {new}, serving "
            f"{replaced_s:.1f} s later; unit active, "
            f"no unit restart; each worker served a call"
        )

    def test_the_units_caps_fit_the_workers(self, workers_box: Container, state: State) -> None:
        # Summed from /proc: the container's systemd may not account memory (MemoryCurrent
        # reads "[not set]" without the memory controller delegated to it).
        pids = [state.main, *sorted(state.workers)]
        out = python(workers_box, PROCESS_USE, *map(str, pids))
        use = {
            int(pid): (int(kib), int(threads))
            for pid, kib, threads in map(str.split, out.splitlines())
        }
        memory = sum(kib for kib, _ in use.values()) * 1024
        tasks = sum(threads for _, threads in use.values())
        memory_max = int(show(workers_box, "MemoryMax"))
        tasks_max = int(show(workers_box, "TasksMax"))
        n = len(state.workers)
        note(
            f"with {n} workers, idle: PSS {memory / 2**20:.0f} MiB in all (MemoryMax "
            f"{memory_max / 2**20:.0f} MiB), {tasks} threads (TasksMax {tasks_max}); per "
            f"process (MiB, threads): "
            + ", ".join(f"{pid}: {kib / 1024:.0f}, {t}" for pid, (kib, t) in use.items())
        )
        # Idle, with room for calls: at most half of each cap.
        assert memory <= memory_max // 2
        assert tasks <= tasks_max // 2

    def test_security_exposure(self, workers_box: Container) -> None:
        out = workers_box.run(["systemd-analyze", "security", "--no-pager", "vibectld.service"])
        match = re.search(r"Overall exposure level for vibectld\.service:\s*([\d.]+)", out.stdout)
        assert match, out.describe()
        exposure = float(match.group(1))
        note(f"systemd-analyze security vibectld: overall exposure {exposure}")
        assert exposure <= EXPOSURE_LIMIT, out.stdout

    def test_stop_is_clean_and_leaves_no_process(
        self, workers_box: Container, state: State
    ) -> None:
        assert show(workers_box, "NRestarts") == "0"
        started = time.monotonic()
        with timed("workers: systemctl stop vibectld"):
            ok(systemctl(workers_box, "stop", "vibectld"))
        took = time.monotonic() - started
        assert took < 25, "stop should not run into TimeoutStopSec"
        assert unit_state(workers_box) == "inactive"
        assert show(workers_box, "Result") == "success"
        left = python(workers_box, DAEMON_PROCESSES).strip()
        journal = ok(
            workers_box.run(["journalctl", "--no-pager", "-u", "vibectld", "-o", "cat"], timeout=30)
        )
        killed = [line for line in journal.splitlines() if "SIGKILL" in line or "Killing" in line]
        note(f"stop took {took:.1f} s; processes left: {left or 'none'}")
        assert not left, left
        assert not killed, killed
