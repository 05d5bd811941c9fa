"""PostgreSQL down is an outage of admin, not of service (issue 14, point 5).

A real vibectld on `storage.backend: postgresql`, a real PostgreSQL 15 that the test
stops and starts (`pg_ctl stop -m fast`: every connection is cut and new ones are
refused), real TLS calls, the real `vibectl-admin` process, the gRPC health service and
the Prometheus endpoint. With `storage.on_stale: serve`, a known client is served
throughout (0 failed calls) while status, health and metrics say the node is degraded,
admin changes fail at once with exit 1, and after the database is back the node
recovers without a restart and the usage equals the calls served, outage included.
With `refuse`, calls get UNAVAILABLE only while the node is stale, then are served.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import RunningDaemon
from tests.conftest import admin_cli as admin
from tests.integration.test_postgresql_backend import Node, _issue, _json, start_node
from tests.postgres import Postgres
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.admin.client import AdminClientError
from vibectld.ops.watchdog import Heartbeat

__all__ = ["start_node"]  # the fixture, shared with the PostgreSQL backend's tests

MAX_STALENESS = 1.0


class OutageNode(Node):
    """A node with storage.on_stale, a short storage.max_staleness and metrics on."""

    def __init__(self, root: Path, name: str, on_stale: str) -> None:
        super().__init__(root, name)
        self.on_stale = on_stale

    def config_file(self) -> Path:
        path = super().config_file()
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        doc["storage"].update(max_staleness=f"{MAX_STALENESS:g}s", on_stale=self.on_stale)
        doc["metrics"] = {"listen": "127.0.0.1:0"}
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path


def _call(daemon: RunningDaemon, secret: str) -> tuple[str, str]:
    """One Execute on a new connection: its status code's name and its message."""
    with grpc.secure_channel(
        f"localhost:{daemon.port}", grpc.ssl_channel_credentials(daemon.ca_pem)
    ) as channel:
        try:
            pb_grpc.VibectlLLMProxyStub(channel).Execute(
                pb.ExecuteRequest(user_fragments=["hi"]),
                metadata=[("authorization", f"Bearer {secret}")],
                timeout=30,
            )
        except grpc.RpcError as e:
            return str(e.code().name), str(e.details())
    return "OK", ""


def _health(daemon: RunningDaemon) -> dict[str, str]:
    """The health service's answer for each name the daemon sets."""
    names = ("", "vibectl.llm_proxy.VibectlLLMProxy", "vibectld.storage")
    with grpc.secure_channel(
        f"localhost:{daemon.port}", grpc.ssl_channel_credentials(daemon.ca_pem)
    ) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return {
            name: health_pb2.HealthCheckResponse.ServingStatus.Name(
                stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
            )
            for name in names
        }


def _metrics(daemon: RunningDaemon) -> dict[str, float]:
    port = daemon.runtime.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for name in (
        "vibectld_storage_degraded",
        "vibectld_storage_stale",
        "vibectld_storage_view_age_seconds",
        "vibectld_usage_buffered_calls",
    ):
        match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
        assert match, f"{name} is not in the metrics"
        found[name] = float(match.group(1))
    return found


def _storage(daemon: RunningDaemon) -> dict[str, Any]:
    return dict(daemon.admin("status")["storage"])


def _wait(what: str, ready: Callable[[], bool], seconds: float = 15) -> float:
    """Seconds until `ready()` held (polled every 50 ms); fails after `seconds`."""
    start = time.monotonic()
    while not ready():
        if time.monotonic() - start > seconds:
            pytest.fail(f"not {what} within {seconds} s")
        time.sleep(0.05)
    return time.monotonic() - start


def _usage(daemon: RunningDaemon) -> dict[str, int]:
    return {row["name"]: row["requests"] for row in _json(daemon, "usage")}


def test_serve_keeps_known_clients_served_and_refuses_admin_changes_at_once(
    postgres: Postgres,
    start_node: Callable[[Node], RunningDaemon],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    node = OutageNode(tmp_path, "node-a", "serve")
    node.install_dsn(postgres.dsn)
    daemon = start_node(node)
    alice = _issue(daemon, "alice")
    served = 0
    for _ in range(3):
        assert _call(daemon, alice) == ("OK", "")
        served += 1
    _wait("fresh", lambda: not _storage(daemon)["stale"])
    _wait("healthy", lambda: set(_health(daemon).values()) == {"SERVING"}, 1)

    stopped_at = time.monotonic()
    postgres.stop()
    try:
        # Calls go on while the node finds out, and after: not one fails.
        detected = _wait("degraded", lambda: _storage(daemon)["degraded"])
        stale = _wait("stale", lambda: _storage(daemon)["stale"])
        outage_calls = 0
        for _ in range(20):
            assert _call(daemon, alice) == ("OK", "")
            outage_calls += 1
        served += outage_calls
        report = [
            f"database stopped: degraded after {detected:.2f} s, stale after "
            f"{detected + stale:.2f} s (max_staleness {MAX_STALENESS:g} s)"
        ]

        storage = _storage(daemon)
        assert storage["degraded"] and storage["stale"]
        assert not storage["refusing_calls"] and storage["on_stale"] == "serve"
        assert "PostgreSQL" in storage["reason"] and storage["since"] is not None
        assert storage["view_age_seconds"] >= MAX_STALENESS
        assert storage["buffered_calls"] >= outage_calls
        human = admin(daemon, "status")
        assert "postgresql, DEGRADED since" in human.stdout
        assert "STALE: serving the clients it knows" in human.stdout
        # The STATUS= line systemd shows.
        line = daemon.daemon._status_line()
        assert "storage degraded since" in line and "serving known clients" in line
        # Calls are served, so the service is; the store is not.
        _wait("storage unhealthy", lambda: _health(daemon)["vibectld.storage"] == "NOT_SERVING", 1)
        assert _health(daemon) == {
            "": "SERVING",
            "vibectl.llm_proxy.VibectlLLMProxy": "SERVING",
            "vibectld.storage": "NOT_SERVING",
        }
        metrics = _metrics(daemon)
        assert metrics["vibectld_storage_degraded"] == 1
        assert metrics["vibectld_storage_stale"] == 1
        assert metrics["vibectld_storage_view_age_seconds"] >= MAX_STALENESS
        assert metrics["vibectld_usage_buffered_calls"] >= outage_calls

        # Admin changes fail at once, whatever they are, with what to expect.
        for op, args in (
            ("issue_client", {"name": "bob"}),
            ("revoke_client", {"target": "alice"}),
            ("update_client", {"target": "alice", "rpm": 5}),
            ("usage", {}),
        ):
            began = time.monotonic()
            with pytest.raises(AdminClientError) as refused:
                daemon.admin(op, args)
            took = time.monotonic() - began
            assert took < 0.5, (op, took)
            report.append(f"{op} refused in {took * 1000:.1f} ms")
            assert "the database is unreachable since" in refused.value.message
        began = time.monotonic()
        out = admin(daemon, "revoke-client", "alice")
        cli_took = time.monotonic() - began
        assert out.returncode == 1, out.stderr
        assert re.search(
            r"the database is unreachable since \d\d:\d\d:\d\d UTC \(cannot reach the "
            r"client registry, the PostgreSQL database .*\); admin changes are refused "
            r"until it answers; known clients are still served",
            out.stderr,
        ), out.stderr
        # The daemon answered in about a millisecond (above); the rest is the start of a
        # Python process, which a loaded machine can stretch: no bound asserted here.
        report.append(f"vibectl-admin revoke-client: exit 1 in {cli_took * 1000:.0f} ms")
        # The refused revocation changed nothing: alice is still served.
        assert _call(daemon, alice) == ("OK", "")
        served += 1
        # A reload needs no database: an operator can change storage.on_stale now.
        assert admin(daemon, "reload", "--wait").returncode == 0
    finally:
        postgres.start()
    restarted_at = time.monotonic()

    recovered = _wait("recovered", lambda: not _storage(daemon)["degraded"])
    _wait("fresh again", lambda: not _storage(daemon)["stale"])
    fresh = time.monotonic() - restarted_at
    report.append(
        f"database back: admin open after {recovered:.2f} s, view fresh after {fresh:.2f} s; "
        f"outage {restarted_at - stopped_at:.1f} s, {outage_calls + 1} calls served in it"
    )
    # Tried every 0.5 s: about that, with room for a loaded machine.
    assert recovered < 5.0
    # The health service follows the store every 0.25 s.
    _wait("healthy", lambda: set(_health(daemon).values()) == {"SERVING"}, 1)
    _wait("the buffer written", lambda: _storage(daemon)["buffered_calls"] == 0)
    assert _metrics(daemon)["vibectld_usage_buffered_calls"] == 0
    # Nothing served is lost: the database counts every call, outage included.
    assert _usage(daemon) == {"alice": served}
    # Admin works again, with no restart; the refused attempts are in the audit trail.
    assert admin(daemon, "issue-client", "bob").returncode == 0
    audit = [(e["op"], e["target"], e["outcome"]) for e in _json(daemon, "audit")]
    assert ("revoke_client", "alice", "failed") in audit
    assert ("issue_client", "bob", "failed") in audit
    captured = capfd.readouterr()
    assert postgres.cluster.password not in captured.out + captured.err
    with capfd.disabled():
        print("", *report, sep="\n")


def test_refuse_answers_unavailable_only_while_stale(
    postgres: Postgres,
    start_node: Callable[[Node], RunningDaemon],
    tmp_path: Path,
) -> None:
    node = OutageNode(tmp_path, "node-r", "refuse")
    node.install_dsn(postgres.dsn)
    daemon = start_node(node)
    alice = _issue(daemon, "alice")
    _wait("fresh", lambda: not _storage(daemon)["stale"])
    assert _call(daemon, alice) == ("OK", "")
    served = 1

    postgres.stop()
    try:
        # Served until the view is stale, then refused: nothing else in between.
        codes: list[str] = []
        began = time.monotonic()
        while not codes or codes[-1] != "UNAVAILABLE":
            code, message = _call(daemon, alice)
            codes.append(code)
            assert time.monotonic() - began < 15, codes
        served += codes.count("OK")
        assert set(codes[:-1]) <= {"OK"}
        assert "cannot reach its database" in message
        assert "another node may answer" in message
        print(f"\nrefusing {time.monotonic() - began:.2f} s after the database stopped")
        for _ in range(5):
            assert _call(daemon, alice)[0] == "UNAVAILABLE"
        # Whatever the secret: the node cannot vouch for any.
        assert _call(daemon, "not-a-secret")[0] == "UNAVAILABLE"
        _wait("unhealthy", lambda: set(_health(daemon).values()) == {"NOT_SERVING"}, 1)
        # NOT_SERVING is still an answer: systemd's watchdog is fed (a restart would not
        # bring the database back).
        beat = Heartbeat(daemon.runtime, daemon.daemon.notifier, daemon.daemon._status_line)
        assert daemon.run(beat._grpc_answers(5.0)) is True
        assert "refusing calls" in daemon.daemon._status_line()
        assert _metrics(daemon)["vibectld_storage_stale"] == 1
        refused = daemon.runtime.metrics.refusals.labels("stale_storage")._value.get()
        assert refused >= 7  # the calls refused above, each counted
        storage = _storage(daemon)
        assert storage["stale"] and storage["refusing_calls"]
        assert "STALE: refusing calls" in admin(daemon, "status").stdout
        # Stale comes from the change feed; that the database is away, from the store's
        # own connection (tried every 2 s): the admin gate follows the latter.
        _wait("degraded", lambda: _storage(daemon)["degraded"])
        out = admin(daemon, "issue-client", "bob")
        assert out.returncode == 1
        assert "calls are refused too while this node's view is stale" in out.stderr
    finally:
        postgres.start()
    restarted_at = time.monotonic()

    codes = []
    while not codes or codes[-1] != "OK":
        codes.append(_call(daemon, alice)[0])
        assert time.monotonic() - restarted_at < 15, codes
    print(f"served again {time.monotonic() - restarted_at:.2f} s after the database started")
    assert set(codes[:-1]) <= {"UNAVAILABLE"}
    for _ in range(5):
        assert _call(daemon, alice) == ("OK", "")
    served += 6
    _wait("healthy", lambda: set(_health(daemon).values()) == {"SERVING"}, 1)
    _wait("the buffer written", lambda: _storage(daemon)["buffered_calls"] == 0)
    assert _usage(daemon) == {"alice": served}


def test_serve_loses_no_call_and_no_count_through_a_database_outage_under_load(
    postgres: Postgres,
    start_node: Callable[[Node], RunningDaemon],
    tmp_path: Path,
) -> None:
    """Four callers call without pause while PostgreSQL stops for about 3 s and starts
    again: not one call fails, and the usage equals the calls served."""
    node = OutageNode(tmp_path, "node-l", "serve")
    node.install_dsn(postgres.dsn)
    daemon = start_node(node)
    names = {_issue(daemon, f"c{i}"): f"c{i}" for i in range(4)}
    _wait("fresh", lambda: not _storage(daemon)["stale"])
    ca = tmp_path / "ca.pem"
    ca.write_bytes(daemon.ca_pem)
    command = [sys.executable, "-m", "tests.integration.outage_caller", str(daemon.port)]
    with subprocess.Popen(
        [*command, str(ca), *names],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    ) as callers:
        assert callers.stdin is not None and callers.stdout is not None
        try:
            assert callers.stdout.readline() == "calling\n"
            _wait("calls", lambda: daemon.runtime.registry.pending_calls() > 0)
            postgres.stop()
            try:
                _wait("stale", lambda: _storage(daemon)["stale"])
                time.sleep(2)
                buffered = _storage(daemon)["buffered_calls"]
            finally:
                postgres.start()
            _wait("recovered", lambda: not _storage(daemon)["degraded"])
            time.sleep(0.5)
        finally:
            callers.stdin.close()  # the callers stop and report
            finished = json.loads(callers.stdout.readline())
    assert [f for result in finished.values() for f in result["failed"]] == []
    served = {names[secret]: result["served"] for secret, result in finished.items()}
    _wait("fresh again", lambda: not _storage(daemon)["stale"])
    _wait("the buffer written", lambda: _storage(daemon)["buffered_calls"] == 0)
    assert _usage(daemon) == served
    print(
        f"\n{sum(served.values())} calls by 4 callers, 0 failed; {buffered} calls' usage held "
        "in memory 2 s into the outage, all written after"
    )
