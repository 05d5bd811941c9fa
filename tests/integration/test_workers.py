"""`server.workers: 2`: two serving processes on one port under one main process.

Real processes throughout (tests/reliability/_procs.py: `vibectld` with the test models,
a NOTIFY_SOCKET as systemd gives one). Every call opens its own connection (a local
subchannel pool), so the kernel's SO_REUSEPORT balancing spreads calls over the
workers; the tests check where calls landed from `status` (each worker's calls in
flight), not by assuming it. What is proved, in the order of issue 15's item 2:

- READY=1 only once both workers serve; `status` lists both (pid, state, restarts);
- calls are served by both workers;
- `--rpm 5` serves exactly 5 of 12 rapid calls, and `--concurrency 2` runs exactly 2
  of 6 held calls, across workers;
- a revocation is refused on the next request on every worker, and ends the client's
  open streams on every worker with UNAUTHENTICATED;
- usage totals equal the calls served;
- refusals a worker decides alone (a bad secret, an invalid request) are in the main
  process's metrics, and those the main process decides (rpm) are counted once;
- a reload swaps every worker's generation, and a rejected one swaps none;
- SIGKILL of a worker mid-stream: its stream ends UNAVAILABLE, a call on the other
  worker finishes OK, a replacement starts (status shows the restart) and the killed
  call's concurrency slot is back at once;
- SIGTERM drains every worker: calls running finish OK, every process exits.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from bench.postgres import free_port
from tests.cluster import Node, generate_cluster_key
from tests.conftest import short_tmpdir
from tests.integration.conftest import write
from tests.integration.test_reload import NotifySocket, base_config
from tests.postgres import Postgres
from tests.reliability._procs import BIN, DaemonProcess, auth, ready
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.admin.client import AdminClient

pytestmark = pytest.mark.timeout(300)

WORKERS = 2


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    root = tmp_path_factory.mktemp("workers")
    metrics = f"127.0.0.1:{free_port()}"
    with DaemonProcess(
        root, fake_models=True, server={"workers": WORKERS}, metrics={"listen": metrics}
    ) as d:
        d.start()
        yield d


def call(
    d: DaemonProcess,
    secret: str,
    prompt: str = "hi",
    *,
    stream: bool = False,
    timeout: float = 30,
    model: str = "faults",
) -> str:
    """One call on a connection of its own: "OK", "MODEL:<code>" or a status name."""
    ca = ca_of(d)
    options = [("grpc.use_local_subchannel_pool", 1)]
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    with grpc.secure_channel(f"localhost:{d.port}", creds, options=options) as channel:
        stub = pb_grpc.VibectlLLMProxyStub(channel)
        request = pb.ExecuteRequest(user_fragments=[prompt], model_name=model)
        try:
            if stream:
                for chunk in stub.StreamExecute(request, metadata=auth(secret), timeout=timeout):
                    if chunk.HasField("error"):
                        return f"MODEL:{chunk.error.error_code}"
                return "OK"
            reply = stub.Execute(request, metadata=auth(secret), timeout=timeout)
        except grpc.RpcError as e:
            return str(e.code().name)
    return f"MODEL:{reply.error.error_code}" if reply.HasField("error") else "OK"


_CA: dict[int, bytes] = {}


def ca_of(d: DaemonProcess) -> bytes:
    """The CA the daemon's certificate chains to (its own, or the cluster's)."""
    if id(d) not in _CA:
        path = d.state_dir / "tls" / "ca.pem"
        _CA[id(d)] = path.read_bytes() if path.exists() else d.admin("show_ca")["pem"].encode()
    return _CA[id(d)]


def in_background(
    d: DaemonProcess, secret: str, prompts: list[str], stream: bool = False
) -> tuple[list[str], threading.Thread]:
    """Start one call per prompt at once; their outcomes land in the list as they end."""
    outcomes: list[str] = []

    def run() -> None:
        with ThreadPoolExecutor(len(prompts)) as pool:
            outcomes.extend(pool.map(lambda p: call(d, secret, p, stream=stream), prompts))

    thread = threading.Thread(target=run)
    thread.start()
    return outcomes, thread


def wait_until(check: Any, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def workers(d: DaemonProcess) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = d.admin("status")["workers"]
    return rows


def in_flight(d: DaemonProcess, name: str) -> int:
    return int(d.admin("status")["in_flight_by_client"].get(name, 0))


def usage(d: DaemonProcess, name: str) -> int:
    """Requests of `name` today, as `vibectl-admin usage` reads them (the database)."""
    rows = d.admin("usage", {"name": name})["usage"]
    return sum(int(row["requests"]) for row in rows)


def test_ready_only_when_every_worker_serves_and_status_lists_them(
    daemon: DaemonProcess,
) -> None:
    # start() returned on READY=1: by then both workers served.
    assert any(ready(m.split("\n")) for m in daemon.notify.messages)
    rows = workers(daemon)
    assert [r["index"] for r in rows] == [1, 2]
    assert all(r["state"] == "serving" and r["restarts"] == 0 for r in rows), rows
    pids = {r["pid"] for r in rows}
    assert len(pids) == WORKERS and daemon.pid not in pids
    for pid in pids:
        os.kill(pid, 0)  # alive
    shown = subprocess.run(
        [str(BIN / "vibectl-admin"), "--socket", str(daemon.admin_socket), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    for row in rows:
        line = rf"worker {row['index']}:\s+pid {row['pid']}, serving, started .*, 0 in flight"
        assert re.search(line, shown.stdout), shown.stdout


def test_calls_are_served_by_every_worker(daemon: DaemonProcess) -> None:
    secret = daemon.issue("spread")
    outcomes, thread = in_background(daemon, secret, ["sleep:3"] * 16)
    try:
        assert wait_until(lambda: in_flight(daemon, "spread") == 16, 20), workers(daemon)
        rows = workers(daemon)
        assert all(r["in_flight"] >= 1 for r in rows), rows
        assert sum(r["in_flight"] for r in rows) == 16
    finally:
        thread.join(60)
    assert outcomes == ["OK"] * 16


def test_rpm_5_serves_exactly_5_of_12_across_workers(daemon: DaemonProcess) -> None:
    secret = daemon.issue("rpm5", rpm=5)
    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(lambda _: call(daemon, secret), range(12)))
    assert sorted(outcomes) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 7, outcomes


def test_concurrency_2_runs_exactly_2_of_6_across_workers(daemon: DaemonProcess) -> None:
    secret = daemon.issue("conc2", concurrency=2)
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda _: call(daemon, secret, "sleep:2"), range(6)))
    assert sorted(outcomes) == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4, outcomes
    # The slots came back: the next call runs.
    assert call(daemon, secret) == "OK"


def test_revocation_is_refused_next_and_cuts_streams_on_every_worker(
    daemon: DaemonProcess,
) -> None:
    secret = daemon.issue("revoked")
    outcomes, thread = in_background(daemon, secret, ["sleep:60"] * 8, stream=True)
    try:
        assert wait_until(lambda: in_flight(daemon, "revoked") == 8, 20)
        rows = workers(daemon)
        assert all(r["in_flight"] >= 1 for r in rows), rows  # streams open on both
        answer = daemon.admin("revoke_client", {"target": "revoked"})
        # Every worker acknowledged before the answer: the next request is refused on
        # each of them (eight connections land on both).
        with ThreadPoolExecutor(8) as pool:
            after = list(pool.map(lambda _: call(daemon, secret), range(8)))
        assert after == ["UNAUTHENTICATED"] * 8, after
    finally:
        thread.join(30)
    assert outcomes == ["UNAUTHENTICATED"] * 8, (answer, outcomes)
    assert answer["cancelled_calls"] == 8
    # Status counts each worker's calls as its last ping (every 0.5 s) said.
    assert wait_until(lambda: in_flight(daemon, "revoked") == 0, 2)


def test_signing_key_rotation_and_retirement_reach_every_worker(daemon: DaemonProcess) -> None:
    old_secret = daemon.issue("old-key")
    retiring = daemon.admin("rotate_signing_key")["previous"]
    # A secret the new key signed verifies on every worker (eight connections).
    new_secret = daemon.issue("new-key")
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda _: call(daemon, new_secret), range(8))) == ["OK"] * 8
    streams, thread = in_background(daemon, old_secret, ["sleep:60"] * 8, stream=True)
    try:
        assert wait_until(lambda: in_flight(daemon, "old-key") == 8, 20)
        daemon.admin("retire_signing_key", {"target": retiring})
        with ThreadPoolExecutor(8) as pool:
            after = list(pool.map(lambda _: call(daemon, old_secret), range(8)))
        assert after == ["UNAUTHENTICATED"] * 8, after
    finally:
        thread.join(30)
    assert streams == ["UNAUTHENTICATED"] * 8, streams
    assert call(daemon, new_secret) == "OK"


def test_a_token_budget_holds_across_workers(daemon: DaemonProcess) -> None:
    # Each call of `faults` with "hi" costs 4 tokens (1 in, 3 out); a call is refused
    # once the day's 10 are spent: 3 served, whichever worker each lands on.
    secret = daemon.issue("budgeted", tokens_per_day=10)
    outcomes = [call(daemon, secret) for _ in range(6)]
    assert outcomes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 3, outcomes


def test_usage_totals_equal_served_calls(daemon: DaemonProcess) -> None:
    secret = daemon.issue("counted", rpm=20)
    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(lambda _: call(daemon, secret), range(30)))
    served = outcomes.count("OK")
    assert served == 20, outcomes  # and the 10 refused are not in the totals
    # The main process writes its counts every 2 s; usage reads the database.
    assert wait_until(lambda: usage(daemon, "counted") == served, 10), usage(daemon, "counted")
    # Its metrics endpoint counts the workers' calls too.
    url = f"http://{daemon.raw['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    line = 'vibectld_requests_total{client="counted",model="faults",outcome="ok"} 20.0'
    assert line in text, [t for t in text.splitlines() if "counted" in t]


def refusals(d: DaemonProcess) -> dict[str, float]:
    """`vibectld_refusals_total` by reason, from the main process's metrics endpoint."""
    url = f"http://{d.raw['metrics']['listen']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = re.findall(r'^vibectld_refusals_total\{reason="([a-z_]+)"\} (\S+)$', text, re.M)
    return {reason: float(n) for reason, n in found}


def test_refusals_on_workers_are_counted_once_in_the_main_metrics(
    daemon: DaemonProcess,
) -> None:
    before = refusals(daemon)
    # Decided by a worker alone: a bad secret (refused by its call gate, from the
    # headers) and an empty prompt (by its servicer); on both workers (a connection each).
    bad = [call(daemon, "not-a-secret", stream=i % 2 == 1) for i in range(6)]
    secret = daemon.issue("refusals", rpm=2)
    empty = [call(daemon, secret, " ") for _ in range(2)]
    # Decided by the main process (rpm, at admission), answered by a worker: once.
    rpm = [call(daemon, secret) for _ in range(3)]
    assert bad == ["UNAUTHENTICATED"] * 6, bad
    assert empty == ["INVALID_ARGUMENT"] * 2, empty
    assert rpm == ["RESOURCE_EXHAUSTED"] * 3, rpm  # the empty prompts counted in the rpm
    want = {"unauthenticated": 6.0, "invalid_argument": 2.0, "rpm": 3.0}

    def added() -> dict[str, float]:
        after = refusals(daemon)
        return {r: after.get(r, 0.0) - before.get(r, 0.0) for r in set(after) | set(before)}

    # Forwarded at the worker's next loop turn: at once, but over a socket.
    wait_until(lambda: {r: n for r, n in added().items() if n} == want, 10)
    assert {r: n for r, n in added().items() if n} == want


def test_reload_swaps_every_worker_or_none(daemon: DaemonProcess) -> None:
    before = {r["generation"] for r in workers(daemon)}
    assert len(before) == 1
    (generation,) = before
    good = dict(daemon.raw)
    daemon.raw = {**good, "limits": {**good["limits"], "max_input_chars": 100_000}}
    daemon.write_config()
    notes = daemon.admin("reload", {"wait": True})
    assert wait_until(lambda: {r["generation"] for r in workers(daemon)} == {generation + 1}, 5), (
        notes,
        workers(daemon),
    )

    # A file the workers cannot build (a TLS key that is not there): none swaps.
    daemon.raw = {
        **daemon.raw,
        "server": {
            **daemon.raw["server"],
            "tls": {"cert_file": "/nonexistent/cert.pem", "key_file": "/nonexistent/key.pem"},
        },
    }
    daemon.write_config()
    with pytest.raises(Exception, match="cert"):
        daemon.admin("reload", {"wait": True})
    time.sleep(PING_WAIT)
    assert {r["generation"] for r in workers(daemon)} == {generation + 1}
    daemon.raw = good
    daemon.write_config()
    secret = daemon.issue("after-reload")
    assert call(daemon, secret) == "OK"


PING_WAIT = 1.5  # the main process pings each worker every second


def test_sigkill_of_a_worker_mid_stream(daemon: DaemonProcess) -> None:
    victim_secret = daemon.issue("victim", concurrency=1)
    other_secret = daemon.issue("bystander")
    victim, victim_thread = in_background(daemon, victim_secret, ["sleep:60"], stream=True)
    assert wait_until(lambda: in_flight(daemon, "victim") == 1, 20)
    rows = workers(daemon)
    (busy,) = [r for r in rows if r["in_flight"] == 1]
    (idle,) = [r for r in rows if r is not busy]
    # A call of another client on the other worker: open connections until one lands
    # there (each lands on either worker; the killed one's would fail too).
    bystanders: list[tuple[list[str], threading.Thread]] = []
    for _ in range(8):
        bystanders.append(in_background(daemon, other_secret, ["sleep:3"]))
    assert wait_until(lambda: in_flight(daemon, "bystander") == 8, 20)
    on_idle = next(r for r in workers(daemon) if r["index"] == idle["index"])["in_flight"]
    assert on_idle >= 1

    # The file broken since the last reload: the replacement must start and serve what
    # the other worker serves (the main process's configuration), not read the file.
    daemon.write_config("server: [this is not a configuration")
    os.kill(busy["pid"], signal.SIGKILL)
    victim_thread.join(30)
    assert victim == ["UNAVAILABLE"]
    # Its slot is back at once (concurrency 1), served by the live worker or the new one.
    assert wait_until(lambda: call(daemon, victim_secret) == "OK", 10)
    outcomes = []
    for out, thread in bystanders:
        thread.join(30)
        outcomes.extend(out)
    # The bystanders on the surviving worker saw nothing; those on the killed one
    # failed with UNAVAILABLE (retryable), nothing else.
    assert sorted(outcomes) == ["OK"] * on_idle + ["UNAVAILABLE"] * (8 - on_idle), outcomes

    def replaced() -> bool:
        row = next(r for r in workers(daemon) if r["index"] == busy["index"])
        return bool(row["state"] == "serving" and row["restarts"] == 1)

    assert wait_until(replaced, 30), workers(daemon)
    row = next(r for r in workers(daemon) if r["index"] == busy["index"])
    assert row["pid"] != busy["pid"]
    with ThreadPoolExecutor(8) as pool:
        longer = list(pool.map(lambda _: call(daemon, other_secret, "hello world"), range(8)))
    assert longer == ["OK"] * 8, longer
    daemon.write_config()


def test_sigterm_drains_every_worker(tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, fake_models=True, server={"workers": WORKERS}) as d:
        d.start()
        pids = [r["pid"] for r in workers(d)]
        secret = d.issue("draining")
        outcomes, thread = in_background(d, secret, ["sleep:2"] * 8)
        assert wait_until(lambda: in_flight(d, "draining") == 8, 20)
        assert all(r["in_flight"] >= 1 for r in workers(d)), workers(d)
        assert d.stop(timeout=30) == 0
        thread.join(30)
        assert outcomes == ["OK"] * 8
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


def test_on_postgresql_two_workers_are_one_node(postgres: Postgres, tmp_path: Path) -> None:
    """The main process is the node (its cluster limiter, its change feed); its workers
    serve under it: limits across them, revocation on the next request in both."""
    node = Node(
        tmp_path / "pg",
        "pg-node",
        0,
        server={"workers": WORKERS, "name": "pg-node"},
        storage={"backend": "postgresql"},
    )
    node.install_credentials(postgres.dsn, generate_cluster_key())
    with node:
        node.start()
        assert [r["state"] for r in workers(node)] == ["serving"] * WORKERS
        limited = node.issue("pg-rpm5", rpm=5)
        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(lambda _: call(node, limited), range(12)))
        assert sorted(outcomes) == ["OK"] * 5 + ["RESOURCE_EXHAUSTED"] * 7, outcomes

        secret = node.issue("pg-revoked")
        streams, thread = in_background(node, secret, ["sleep:60"] * 8, stream=True)
        try:
            assert wait_until(lambda: in_flight(node, "pg-revoked") == 8, 20)
            assert all(r["in_flight"] >= 1 for r in workers(node)), workers(node)
            node.admin("revoke_client", {"target": "pg-revoked"})
            with ThreadPoolExecutor(8) as pool:
                after = list(pool.map(lambda _: call(node, secret), range(8)))
            assert after == ["UNAUTHENTICATED"] * 8, after
        finally:
            thread.join(30)
        assert streams == ["UNAUTHENTICATED"] * 8


def test_systemd_sees_every_worker_ready_watched_reloaded_and_stopped(tmp_path: Path) -> None:
    """The packaged command under a NOTIFY_SOCKET and WATCHDOG_USEC, as systemd runs it:
    READY=1 once both workers serve, WATCHDOG=1 while both answer, SIGHUP reloads both,
    SIGTERM stops all three processes."""
    sock_dir = short_tmpdir()
    notify = NotifySocket(sock_dir)
    raw = base_config(tmp_path, sock_dir)
    raw["server"]["workers"] = WORKERS
    path = tmp_path / "config.yaml"
    write(path, raw)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}
    proc = subprocess.Popen(
        [str(BIN / "vibectld"), "--config", str(path)], env=env, stderr=subprocess.DEVNULL
    )
    try:
        ready_line = notify.wait_for("READY=1")
        assert f"{WORKERS} of {WORKERS} workers serving" in ready_line, ready_line
        assert notify.wait_for("WATCHDOG=1")
        with AdminClient(sock_dir / "admin.sock", timeout=30) as client:
            pids = [r["pid"] for r in client.call("status", {})["workers"]]
        assert len(pids) == WORKERS

        # A worker that does not answer (stopped): no WATCHDOG=1 until it does again.
        os.kill(pids[0], signal.SIGSTOP)
        try:
            time.sleep(1.5)  # its last answer goes stale (pings every 0.5 s)
            assert "WATCHDOG=1" not in watched_for(notify, 2.5)
        finally:
            os.kill(pids[0], signal.SIGCONT)
        assert "WATCHDOG=1" in watched_for(notify, 5, until="WATCHDOG=1")

        raw["models"] = {"default": "echo", "aliases": {"after-hup": "echo"}}
        write(path, raw)
        proc.send_signal(signal.SIGHUP)
        assert notify.wait_for("RELOADING=1")
        assert notify.wait_for("READY=1")
        with AdminClient(sock_dir / "admin.sock", timeout=30) as client:
            assert wait_until(
                lambda: {r["generation"] for r in client.call("status", {})["workers"]} == {2},
                5,
            )
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1")
        assert proc.wait(30) == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def watched_for(notify: NotifySocket, seconds: float, until: str | None = None) -> list[str]:
    """The fields the daemon sent in the next `seconds` (after what was waiting), or
    until one is `until`."""
    notify.sock.settimeout(0.001)
    try:
        while True:
            notify.sock.recv(65536)  # what was sent before: not this window's
    except (TimeoutError, BlockingIOError):
        pass
    fields: list[str] = []
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            notify.sock.settimeout(left)
            try:
                fields.extend(notify.sock.recv(65536).decode().split("\n"))
            except TimeoutError:
                break
            if until is not None and until in fields:
                break
    finally:
        notify.sock.settimeout(30)
    return fields


def test_workers_stop_when_their_main_process_is_killed(tmp_path: Path) -> None:
    """No orphan keeps the port: a worker whose main process is gone stops."""
    with DaemonProcess(tmp_path, fake_models=True, server={"workers": WORKERS}) as d:
        d.start()
        pids = [r["pid"] for r in workers(d)]
        d.kill()

        def gone(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            # A zombie until init reaps it: gone as far as the port is concerned.
            return Path(f"/proc/{pid}/status").read_text().count("State:\tZ") == 1

        assert wait_until(lambda: all(gone(pid) for pid in pids), 15), pids


def test_the_server_wide_cap_is_shared_out_between_workers(tmp_path: Path) -> None:
    """server.max_concurrent_calls: 4 over two workers: each runs at most 2, so never
    more than 4 run at once; the rest are refused as past the server's cap."""
    with DaemonProcess(
        tmp_path, fake_models=True, server={"workers": WORKERS, "max_concurrent_calls": 4}
    ) as d:
        d.start()
        secret = d.issue("capped")
        with ThreadPoolExecutor(10) as pool:
            outcomes = list(pool.map(lambda _: call(d, secret, "sleep:2"), range(10)))
        served = outcomes.count("OK")
        assert 1 <= served <= 4, outcomes
        assert outcomes.count("RESOURCE_EXHAUSTED") == 10 - served, outcomes
