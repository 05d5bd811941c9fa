"""A real vibectld on `storage.backend: postgresql`, through the real vibectl-admin.

The connection string is the credential `postgresql-dsn` in `keys/` beside the
configuration file, as an operator would install it. One node issues, serves, revokes;
a restart finds all of it (the revocation, usage, audit) in the database, not in the
state directory. A second node on the same database, with its own state directory, sees
at its start the clients the first issued, and the same usage and audit.

The cluster's own claims (the change feed bringing a revocation to running nodes within a
second, one CA and one set of signing keys, limits across nodes, a database outage) are
proved in test_cluster*.py, test_cluster_pki.py and tests/store/test_feed.py; the last
part here shows that a write decides on the database's rows whatever memory holds.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
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
from vibectld.daemon import Daemon
from vibectld.pki.sealed import ClusterKey
from vibectld.startup import StartupError

_CLUSTER_KEY = ClusterKey.generate()[1]


class Node:
    """Where one node's files live: its config (with keys/ beside it) and state dir."""

    def __init__(self, root: Path, name: str) -> None:
        self.name = name
        self.etc = root / name / "etc"
        self.state = root / name / "state"
        self.socks = short_tmpdir()

    def config_file(self) -> Path:
        doc: dict[str, Any] = {
            "server": {"listen": "127.0.0.1:0", "name": self.name},
            "admin": {
                "socket": str(self.socks / "admin.sock"),
                "group": grp.getgrgid(os.getgid()).gr_name,
            },
            "state_dir": str(self.state),
            "models": {"default": "echo"},
            "limits": {"requests_per_minute": None, "concurrent_requests": None},
            "logging": {"level": "warning", "format": "console"},
            "storage": {"backend": "postgresql"},
        }
        self.etc.mkdir(parents=True, exist_ok=True)
        path = self.etc / "config.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path

    def install_dsn(self, dsn: str) -> None:
        keys = self.etc / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        path = keys / "postgresql-dsn"
        path.write_text(dsn + "\n", encoding="utf-8")
        os.chmod(path, 0o600)
        # Every node of one test shares the cluster key, as every node of a cluster must.
        path = keys / "cluster-key"
        path.write_text(_CLUSTER_KEY + "\n", encoding="utf-8")
        os.chmod(path, 0o600)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[[Node], RunningDaemon]]:
    _register_fake_models()
    started: list[RunningDaemon] = []
    nodes: list[Node] = []

    def start(node: Node) -> RunningDaemon:
        nodes.append(node)
        running = RunningDaemon(load_config(node.config_file())).start()
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        if running.thread.is_alive():
            running.stop()
    for node in nodes:
        shutil.rmtree(node.socks, ignore_errors=True)


def _issue(daemon: RunningDaemon, name: str) -> str:
    out = admin(daemon, "issue-client", name)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split("://", 1)[1].split("@", 1)[0]


def _call(daemon: RunningDaemon, secret: str) -> str:
    """One Execute; its status code's name."""
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
            return str(e.code().name)
    return "OK"


def _json(daemon: RunningDaemon, *args: str) -> Any:
    out = admin(daemon, "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _statuses(daemon: RunningDaemon) -> dict[str, str]:
    return {c["name"]: c["status"] for c in _json(daemon, "list-clients", "--all")}


def test_issue_serve_revoke_restart_and_a_second_node(
    postgres: Postgres,
    start_node: Callable[[Node], RunningDaemon],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    first = Node(tmp_path, "node-a")
    first.install_dsn(postgres.dsn)
    a = start_node(first)
    storage = _json(a, "status")["storage"]
    assert storage["backend"] == "postgresql"
    assert (storage["degraded"], storage["reason"]) == (False, None)
    alice, bob = _issue(a, "alice"), _issue(a, "bob")
    assert [_call(a, alice), _call(a, bob), _call(a, bob)] == ["OK"] * 3
    revoked = admin(a, "revoke-client", "alice")
    assert revoked.returncode == 0, revoked.stderr
    assert _call(a, alice) == "UNAUTHENTICATED"
    a.stop()  # flushes the counts
    # Nothing of the registry is in the state directory: the database holds it.
    assert not (first.state / "registry.db").exists()

    a = start_node(first)
    assert _statuses(a) == {"alice": "revoked", "bob": "active"}
    assert _call(a, alice) == "UNAUTHENTICATED"
    assert _call(a, bob) == "OK"
    usage = {row["name"]: row["requests"] for row in _json(a, "usage")}
    assert usage == {"alice": 1, "bob": 3}
    ops = [(e["op"], e["target"]) for e in _json(a, "audit")]
    assert ("issue_client", "alice") in ops and ("revoke_client", "alice") in ops
    carol = _issue(a, "carol")

    # A second node, its own state directory and socket, on the same database.
    second = Node(tmp_path, "node-b")
    second.install_dsn(postgres.dsn)
    b = start_node(second)
    assert _statuses(b) == {"alice": "revoked", "bob": "active", "carol": "active"}
    assert {row["name"]: row["requests"] for row in _json(b, "usage")} == usage
    assert ("revoke_client", "alice") in [(e["op"], e["target"]) for e in _json(b, "audit")]
    # Every node's heartbeat (one per flush, every 2 s) is listed on every node.
    assert _wait_for_nodes(b, {"node-a", "node-b"})

    # The name is taken cluster-wide, whichever node is asked.
    taken = admin(b, "issue-client", "carol")
    assert taken.returncode != 0 and "an active client named 'carol' exists" in taken.stderr
    # Revoked on b; a, already running, learns of it when it writes carol itself (the
    # change feed that would tell it at once is the next phase), and refuses her from then.
    assert admin(b, "revoke-client", "carol").returncode == 0
    again = admin(a, "revoke-client", "carol")
    assert again.returncode == 1 and "already revoked" in again.stderr
    assert _call(a, carol) == "UNAUTHENTICATED"

    out, err = capfd.readouterr()
    assert postgres.cluster.password not in out + err


def _wait_for_nodes(daemon: RunningDaemon, names: set[str], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if {n["name"] for n in _json(daemon, "status").get("nodes", [])} >= names:
            return True
        time.sleep(0.25)
    return False


def test_a_missing_connection_string_stops_the_start_naming_where_to_put_it(
    tmp_path: Path,
) -> None:
    node = Node(tmp_path, "lonely")
    config = load_config(node.config_file())
    with pytest.raises(StartupError) as failed:
        asyncio.run(Daemon(config).start())
    message = str(failed.value)
    assert "postgresql-dsn credential is missing" in message
    assert str(node.etc.resolve() / "keys" / "postgresql-dsn") in message
    assert "CREDENTIALS_DIRECTORY" in message
    shutil.rmtree(node.socks, ignore_errors=True)


def test_a_database_that_goes_away_fails_admin_writes_not_calls(
    postgres: Postgres,
    start_node: Callable[[Node], RunningDaemon],
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    node = Node(tmp_path, "node-a")
    node.install_dsn(postgres.dsn)
    daemon = start_node(node)
    alice = _issue(daemon, "alice")
    postgres.stop()
    try:
        failed = admin(daemon, "issue-client", "bob")
        assert failed.returncode == 1 and failed.stdout == ""
        assert "cannot reach the client registry, the PostgreSQL database" in failed.stderr
        assert "check that PostgreSQL is running" in failed.stderr
        assert postgres.cluster.password not in failed.stderr
        # Known clients are served from memory meanwhile; status says the store is down.
        assert _call(daemon, alice) == "OK"
        storage = _json(daemon, "status")["storage"]
        assert storage["degraded"] is True and "PostgreSQL" in storage["reason"]
        human = admin(daemon, "status")
        assert "postgresql, DEGRADED" in human.stdout
    finally:
        postgres.start()
    # Back without a restart: the node tries the database every 0.5 s while it is away
    # (admin changes are refused at once meanwhile), and the next write goes through.
    deadline = time.monotonic() + 5
    while _json(daemon, "status")["storage"]["degraded"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert admin(daemon, "issue-client", "bob").returncode == 0
    assert _json(daemon, "status")["storage"]["degraded"] is False
    usage = {row["name"]: row["requests"] for row in _json(daemon, "usage")}
    assert usage == {"alice": 1}
    out, err = capfd.readouterr()
    assert postgres.cluster.password not in out + err
