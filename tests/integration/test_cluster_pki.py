"""One CA and one set of signing keys for every node of a cluster, through real daemons
on a real PostgreSQL.

Each node is a vibectld in this process with its own state directory and admin socket,
`storage.backend: postgresql`, and the credentials `postgresql-dsn` and `cluster-key` in
`keys/` beside its config file, as an operator installs them. `server.public_url` names
a load balancer (lb.example.test) that does not exist: a client's TLS check against that
name is made by overriding the name gRPC verifies, against the CA the URL pins.
"""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import psycopg
import pytest
import yaml
from cryptography.hazmat.primitives import serialization

from tests.conftest import RunningDaemon, _register_fake_models, short_tmpdir
from tests.conftest import admin_cli as admin
from tests.postgres import Postgres
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectl.proxy_url import parse as parse_url
from vibectld.config_file import load_config
from vibectld.daemon import Daemon
from vibectld.pki.sealed import ClusterKey
from vibectld.pki.tls import ca_fingerprint
from vibectld.startup import StartupError

LB_HOST = "lb.example.test"
PUBLIC_URL = f"vibectl-server://{LB_HOST}:7443"
# The contract: a change on one node reaches the others within a second.
PROPAGATION_SECONDS = 1.0


class Node:
    """Where one node's files live: its config (with keys/ beside it) and state dir."""

    def __init__(self, root: Path, name: str, dsn: str, cluster_key: str | None) -> None:
        self.name = name
        self.etc = root / name / "etc"
        self.state = root / name / "state"
        self.socks = short_tmpdir()
        keys = self.etc / "keys"
        keys.mkdir(parents=True)
        credentials = {"postgresql-dsn": dsn, "cluster-key": cluster_key}
        for credential, value in credentials.items():
            if value is not None:
                (keys / credential).write_text(value + "\n", encoding="utf-8")
                os.chmod(keys / credential, 0o600)

    def config_file(self) -> Path:
        doc: dict[str, Any] = {
            "server": {"listen": "127.0.0.1:0", "name": self.name, "public_url": PUBLIC_URL},
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
        path = self.etc / "config.yaml"
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return path


@pytest.fixture
def cluster_key() -> str:
    return ClusterKey.generate()[1]


@pytest.fixture
def node(
    tmp_path: Path, postgres: Postgres, cluster_key: str
) -> Iterator[Callable[..., RunningDaemon]]:
    """Start a node: `node("a")`; all of them stop at teardown."""
    _register_fake_models()
    started: list[RunningDaemon] = []
    made: list[Node] = []

    def start(name: str, key: str | None = cluster_key) -> RunningDaemon:
        where = Node(tmp_path, name, postgres.dsn, key)
        made.append(where)
        running = RunningDaemon(load_config(where.config_file()))
        started.append(running)
        return running.start()

    yield start
    for running in reversed(started):
        if running.thread.is_alive():
            running.stop()
    for where in made:
        shutil.rmtree(where.socks, ignore_errors=True)


def issue(daemon: RunningDaemon, name: str) -> tuple[str, str]:
    """(secret, the URL's ca-sha256 pin) of a client issued through the real vibectl-admin."""
    out = admin(daemon, "issue-client", name)
    assert out.returncode == 0, out.stderr
    url = parse_url(out.stdout.strip())
    assert url.host == LB_HOST and url.secret and url.ca_sha256
    return url.secret, url.ca_sha256


def call(daemon: RunningDaemon, secret: str, ca_pem: bytes) -> str:
    """One Execute on `daemon`, TLS verified against `ca_pem` for the load balancer's
    name; the status code's name."""
    options = [("grpc.ssl_target_name_override", LB_HOST)]
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{daemon.port}", credentials, options) as channel:
        try:
            pb_grpc.VibectlLLMProxyStub(channel).Execute(
                pb.ExecuteRequest(user_fragments=["hi"]),
                metadata=[("authorization", f"Bearer {secret}")],
                timeout=30,
            )
        except grpc.RpcError as e:
            return str(e.code().name)
    return "OK"


def kid_of(secret: str) -> str:
    return str(jwt.get_unverified_header(secret)["kid"])


def within(seconds: float, check: Callable[[], bool]) -> float | None:
    """How long `check` took to become true, or None if it did not within `seconds`."""
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    return None


def test_two_nodes_serve_one_ca_and_honour_each_other_s_secrets(
    node: Callable[..., RunningDaemon],
) -> None:
    a, b = node("node-a"), node("node-b")
    ca_pem = a.ca_pem
    assert b.ca_pem == ca_pem
    secret, pin = issue(a, "alice")
    # The URL's pin is the one CA every node serves.
    assert pin == ca_fingerprint(ca_pem) == b.runtime.tls.ca_sha256
    assert call(b, secret, ca_pem) == "OK"
    assert call(a, secret, ca_pem) == "OK"
    other, _ = issue(b, "bob")
    assert call(a, other, ca_pem) == "OK"
    for daemon in (a, b):
        tls = daemon.config.state_dir / "tls"
        # Each node's own certificate and key stay in its state directory (key 0600); the
        # CA's key is in the database only, sealed.
        assert sorted(p.name for p in tls.iterdir()) == ["server.key", "server.pem"]
        assert (tls / "server.key").stat().st_mode & 0o777 == 0o600
        assert not (daemon.config.state_dir / "signing-keys").exists()


def test_rotate_and_retire_on_one_node_take_effect_on_the_other(
    node: Callable[..., RunningDaemon],
) -> None:
    a, b = node("node-a"), node("node-b")
    ca_pem = a.ca_pem
    alice, _ = issue(a, "alice")
    first = kid_of(alice)

    rotated = admin(a, "--json", "rotate-signing-key")
    assert rotated.returncode == 0, rotated.stderr
    second = yaml.safe_load(rotated.stdout)["kid"]
    took = within(PROPAGATION_SECONDS, lambda: b.runtime.signing.active_kid == second)
    assert took is not None, "node-b did not learn of the rotation within a second"
    bob, _ = issue(b, "bob")
    assert kid_of(bob) == second
    assert [call(a, bob, ca_pem), call(b, bob, ca_pem)] == ["OK", "OK"]

    assert call(b, alice, ca_pem) == "OK"
    retired = admin(a, "retire-signing-key", first)
    assert retired.returncode == 0, retired.stderr
    took = within(PROPAGATION_SECONDS, lambda: call(b, alice, ca_pem) == "UNAUTHENTICATED")
    assert took is not None, "node-b still honours a retired key after a second"
    assert call(b, bob, ca_pem) == "OK"
    listed = admin(b, "--json", "list-signing-keys")
    rows = {row["kid"]: row for row in yaml.safe_load(listed.stdout)["keys"]}
    assert rows[first]["retired"] is True and rows[second]["current"] is True
    # The cluster decides what is current: node-b refuses to retire the key node-a made.
    refused = admin(b, "retire-signing-key", second)
    assert refused.returncode != 0 and "current" in refused.stderr


def test_a_node_without_the_cluster_s_key_does_not_start(
    node: Callable[..., RunningDaemon], tmp_path: Path, postgres: Postgres
) -> None:
    node("node-a")

    def start_failure(name: str, key: str | None) -> str:
        where = Node(tmp_path, name, postgres.dsn, key)
        try:
            with pytest.raises(StartupError) as failed:
                asyncio.run(Daemon(load_config(where.config_file())).start())
        finally:
            shutil.rmtree(where.socks, ignore_errors=True)
        return str(failed.value)

    other = ClusterKey.generate()[1]
    message = start_failure("node-other", other)
    assert "does not open with this node's cluster-key" in message
    assert "the same cluster-key file" in message
    assert other not in message

    message = start_failure("node-missing", None)
    assert "cluster-key credential is missing" in message
    assert "vibectld --generate-cluster-key" in message
    assert str(tmp_path / "node-missing" / "etc" / "keys" / "cluster-key") in message

    message = start_failure("node-garbled", "not a key")
    assert "does not start with vck1:" in message and "not a key" not in message


def test_the_database_holds_no_private_key_in_plaintext(
    node: Callable[..., RunningDaemon], postgres: Postgres
) -> None:
    a = node("node-a")
    assert admin(a, "rotate-signing-key").returncode == 0
    signing = a.runtime.signing
    assert len(signing.kids) == 2
    secrets: list[bytes] = []
    for key in signing._set.private.values():
        secrets.append(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )
        secrets.append(
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    ca = a.runtime.generation.ca
    assert ca is not None
    secrets.append(ca.key.private_numbers().private_value.to_bytes(32, "big"))
    secrets.append(
        ca.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with psycopg.connect(postgres.dsn) as conn:
        # Every column of every row, as bytes and as PostgreSQL's own text of the row.
        dump = b""
        for table in ("cluster_secrets", "signing_keys"):
            for (row,) in conn.execute(f"SELECT t::text FROM {table} t").fetchall():  # noqa: S608
                dump += row.encode()
        for (sealed,) in conn.execute(
            "SELECT sealed FROM cluster_secrets UNION ALL SELECT sealed FROM signing_keys"
        ).fetchall():
            dump += bytes(sealed)
    assert b"PRIVATE KEY" not in dump
    for secret in secrets:
        assert secret not in dump and secret.hex().encode() not in dump


def test_two_nodes_starting_together_on_an_empty_database_make_one_ca(
    node: Callable[..., RunningDaemon], postgres: Postgres
) -> None:
    started: dict[str, RunningDaemon] = {}
    go = threading.Barrier(2)

    def start(name: str) -> None:
        go.wait()
        started[name] = node(name)

    threads = [threading.Thread(target=start, args=(n,)) for n in ("node-a", "node-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    a, b = started["node-a"], started["node-b"]
    assert a.runtime.tls.ca_sha256 == b.runtime.tls.ca_sha256
    assert a.runtime.signing.kids == b.runtime.signing.kids
    assert len(a.runtime.signing.kids) == 1
    with psycopg.connect(postgres.dsn) as conn:
        names = [r[0] for r in conn.execute("SELECT name FROM cluster_secrets ORDER BY 1")]
        assert names == ["ca", "check"]
        assert conn.execute("SELECT count(*) FROM signing_keys").fetchone() == (1,)


def test_a_renewed_server_certificate_comes_from_the_cluster_s_ca(
    node: Callable[..., RunningDaemon],
) -> None:
    a, b = node("node-a"), node("node-b")
    ca_pem = a.ca_pem
    secret, pin = issue(a, "alice")
    before = b.runtime.tls.cert_chain_pem
    # The documented renewal (what the daemon's own check does near expiry): remove the
    # node's certificate and reload; the reload issues a new one from the CA it holds.
    tls = b.config.state_dir / "tls"
    (tls / "server.pem").unlink()
    (tls / "server.key").unlink()
    reloaded = admin(b, "reload", "--wait")
    assert reloaded.returncode == 0, reloaded.stderr
    assert b.runtime.tls.cert_chain_pem != before
    assert b.runtime.tls.ca_sha256 == pin
    assert call(b, secret, ca_pem) == "OK"


def test_generate_cluster_key_prints_a_new_key_and_where_to_put_it() -> None:
    vibectld = str(Path(sys.executable).parent / "vibectld")
    runs = [
        subprocess.run(
            [vibectld, "--generate-cluster-key"], capture_output=True, text=True, timeout=60
        )
        for _ in range(2)
    ]
    for out in runs:
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("\n") == 1
        ClusterKey.parse(out.stdout)  # what a node will read from the credential file
        assert "/etc/vibectld/keys/cluster-key" in out.stderr and "0600" in out.stderr
        assert out.stdout.strip() not in out.stderr
    assert runs[0].stdout != runs[1].stdout


def test_a_key_retired_on_one_node_ends_its_streams_on_the_other(
    node: Callable[..., RunningDaemon],
) -> None:
    a, b = node("node-a"), node("node-b")
    alice, _ = issue(a, "alice")
    old_kid = kid_of(alice)
    assert admin(a, "rotate-signing-key").returncode == 0
    options = [("grpc.ssl_target_name_override", LB_HOST)]
    credentials = grpc.ssl_channel_credentials(root_certificates=a.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{b.port}", credentials, options) as channel:
        stream = pb_grpc.VibectlLLMProxyStub(channel).StreamExecute(
            pb.ExecuteRequest(user_fragments=["chunks:1000"], model_name="faults"),
            metadata=[("authorization", f"Bearer {alice}")],
            timeout=30,
        )
        assert next(stream).text_chunk == "c0 "
        assert admin(a, "retire-signing-key", old_kid).returncode == 0
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            for _ in stream:
                pass
        # UNAUTHENTICATED, unless the cancel lands while gRPC itself is writing a chunk.
        assert ended.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED)
        assert time.monotonic() - started < PROPAGATION_SECONDS
