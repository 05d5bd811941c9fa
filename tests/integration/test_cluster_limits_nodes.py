"""rpm and concurrency across three real vibectld nodes on one PostgreSQL database.

Three daemons (in this process, each on its own event loop and port, with its own state
directory, sharing the database, the cluster key and so the CA and signing keys), calls
spread over them round robin as a load balancer would. The refusals are the single
node's: RESOURCE_EXHAUSTED with `limit-type` and `retry-after-ms` (tests/integration/
test_usage_controls.py shows them on one node). The kill -9 of a node behind HAProxy is
in the cluster tests; the limiter's own tests (test_cluster_limits.py) show a silent
node's leases stop counting and the fallback when the database stops.
"""

from __future__ import annotations

import grp
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from tests.conftest import RunningDaemon, _register_fake_models, short_tmpdir
from tests.conftest import admin_cli as admin
from tests.postgres import Postgres
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.config_file import load_config
from vibectld.pki.sealed import ClusterKey

_CLUSTER_KEY = ClusterKey.generate()[1]
Outcome = tuple[str, dict[str, str]]


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n", encoding="utf-8")
    os.chmod(path, 0o600)


@pytest.fixture
def nodes(tmp_path: Path, postgres: Postgres) -> Iterator[list[RunningDaemon]]:
    """Three nodes; the first starts alone (it creates the schema, CA and keys)."""
    _register_fake_models()
    started: list[RunningDaemon] = []
    socks = []
    try:
        for name in ("node-a", "node-b", "node-c"):
            etc, sock = tmp_path / name / "etc", short_tmpdir()
            socks.append(sock)
            doc: dict[str, Any] = {
                "server": {"listen": "127.0.0.1:0", "name": name},
                "admin": {
                    "socket": str(sock / "admin.sock"),
                    "group": grp.getgrgid(os.getgid()).gr_name,
                },
                "state_dir": str(tmp_path / name / "state"),
                "models": {"default": "echo"},
                "limits": {"requests_per_minute": None, "concurrent_requests": None},
                "logging": {"level": "warning", "format": "console"},
                "storage": {"backend": "postgresql"},
            }
            _write_secret(etc / "keys" / "postgresql-dsn", postgres.dsn)
            _write_secret(etc / "keys" / "cluster-key", _CLUSTER_KEY)
            (etc / "config.yaml").write_text(yaml.safe_dump(doc), encoding="utf-8")
            started.append(RunningDaemon(load_config(etc / "config.yaml")).start())
        yield started
    finally:
        for running in reversed(started):
            running.stop()
        for sock in socks:
            shutil.rmtree(sock, ignore_errors=True)


def _issue(nodes: list[RunningDaemon], name: str, *flags: str) -> str:
    """Issued on the first node; returned once every node knows the client."""
    out = admin(nodes[0], "issue-client", name, *flags)
    assert out.returncode == 0, out.stderr
    secret = out.stdout.strip().split("://", 1)[1].split("@", 1)[0]
    deadline = time.monotonic() + 10
    for node in nodes[1:]:
        while name not in admin(node, "list-clients").stdout:
            assert time.monotonic() < deadline, "the other nodes did not learn of the client"
            time.sleep(0.1)
    return secret


def _call(node: RunningDaemon, secret: str, prompt: str = "hi", model: str = "echo") -> Outcome:
    with grpc.secure_channel(
        f"localhost:{node.port}", grpc.ssl_channel_credentials(node.ca_pem)
    ) as channel:
        try:
            pb_grpc.VibectlLLMProxyStub(channel).Execute(
                pb.ExecuteRequest(user_fragments=[prompt], model_name=model),
                metadata=[("authorization", f"Bearer {secret}")],
                timeout=30,
            )
        except grpc.RpcError as e:
            return e.code().name, dict(e.trailing_metadata() or ())
    return "OK", {}


def _spread(
    nodes: list[RunningDaemon], n: int, call: Callable[[RunningDaemon], Outcome]
) -> list[Outcome]:
    """n calls at once, round robin over the nodes."""
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: call(nodes[i % len(nodes)]), range(n)))


def test_rpm_5_is_5_of_12_whichever_nodes_serve_them(nodes: list[RunningDaemon]) -> None:
    secret = _issue(nodes, "carol", "--rpm", "5")
    outcomes = _spread(nodes, 12, lambda node: _call(node, secret))
    codes = [code for code, _ in outcomes]
    assert codes.count("OK") == 5 and codes.count("RESOURCE_EXHAUSTED") == 7
    for code, trailers in outcomes:
        if code != "OK":
            assert trailers["limit-type"] == "rpm"
            assert 0 < int(trailers["retry-after-ms"]) <= 60_000


def test_concurrency_holds_across_nodes_and_frees_when_calls_end(
    nodes: list[RunningDaemon], postgres: Postgres
) -> None:
    secret = _issue(nodes, "dora", "--concurrency", "2")
    outcomes = _spread(nodes, 6, lambda node: _call(node, secret, "sleep:1.5", "faults"))
    codes = [code for code, _ in outcomes]
    assert codes.count("OK") == 2 and codes.count("RESOURCE_EXHAUSTED") == 4
    for code, trailers in outcomes:
        if code != "OK":
            assert trailers == {"limit-type": "concurrency", "retry-after-ms": "250"}
    # Released after each call, off its response path: the slots are free for any node.
    deadline = time.monotonic() + 5
    while postgres.sql("SELECT count(*) FROM leases") != "0":
        assert time.monotonic() < deadline, "the finished calls' leases were not released"
        time.sleep(0.05)
    both = _spread(nodes[1:], 2, lambda node: _call(node, secret, "sleep:0.2", "faults"))
    assert [code for code, _ in both] == ["OK", "OK"]


def test_refusals_keep_the_contracts_order_and_a_refused_call_takes_nothing(
    nodes: list[RunningDaemon], postgres: Postgres
) -> None:
    # The checks in memory run before the one round trip; their refusals come after it.
    secret = _issue(nodes, "erin", "--rpm", "4", "--concurrency", "1")
    # Bad input counts against rpm (the rate limit comes before validation)...
    assert _call(nodes[0], secret, " ")[0] == "INVALID_ARGUMENT"
    # ...and takes no slot: with one call running, bad input is still INVALID_ARGUMENT
    # (validation comes before concurrency), and a good call is refused for concurrency.
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_call, nodes[1], secret, "sleep:1.5", "faults")
        deadline = time.monotonic() + 5
        while postgres.sql("SELECT count(*) FROM leases") != "1":
            assert time.monotonic() < deadline, "the long call never took its slot"
            time.sleep(0.02)
        assert _call(nodes[2], secret, " ")[0] == "INVALID_ARGUMENT"
        code, trailers = _call(nodes[0], secret)
        assert (code, trailers["limit-type"]) == ("RESOURCE_EXHAUSTED", "concurrency")
        assert running.result()[0] == "OK"
    # Four counted (two bad, the long one, the one refused for concurrency): the fifth is
    # refused for rpm, bad input or not.
    code, trailers = _call(nodes[1], secret, " ")
    assert (code, trailers["limit-type"]) == ("RESOURCE_EXHAUSTED", "rpm")


def test_with_the_database_down_each_node_enforces_its_share(
    nodes: list[RunningDaemon], postgres: Postgres
) -> None:
    secret = _issue(nodes, "fay", "--rpm", "6", "--concurrency", "3")
    # Every node has seen the three heartbeats: the share is 6 // 3 = 2 calls a minute.
    deadline = time.monotonic() + 10
    while any(len(node.runtime.registry.nodes()) < 3 for node in nodes):
        assert time.monotonic() < deadline, "the nodes never saw each other's heartbeats"
        time.sleep(0.1)
    postgres.stop()
    try:
        outcomes = []
        slowest = 0.0
        for _ in range(3):
            began = time.monotonic()
            outcomes.append(_call(nodes[0], secret))
            slowest = max(slowest, time.monotonic() - began)
        assert [code for code, _ in outcomes] == ["OK", "OK", "RESOURCE_EXHAUSTED"]
        assert outcomes[2][1]["limit-type"] == "rpm"
        # Never held long by the database it cannot reach (a round trip gives up at 250 ms).
        assert slowest < 1.0
        # The other nodes have shares of their own.
        assert _call(nodes[1], secret)[0] == "OK"
    finally:
        postgres.start()
