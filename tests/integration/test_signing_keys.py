"""Rotating and retiring signing keys, and renewing TLS material, against a real daemon."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
import structlog

from tests.conftest import RunningDaemon
from tests.conftest import admin_cli as admin
from tests.docs.manpage import Page
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl.proxy_url import parse as parse_url
from vibectl.tls_pin import fetch_chain

BIN = Path(sys.executable).parent


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def request(text: str = "hi", model: str | None = None) -> pb.ExecuteRequest:
    req = pb.ExecuteRequest(user_fragments=[text], request_id="r1")
    if model is not None:
        req.model_name = model
    return req


def served(daemon: RunningDaemon, secret: str) -> bool:
    reply = daemon.stub().Execute(request(), metadata=auth(secret), timeout=10)
    return bool(reply.HasField("success"))


def refusal(daemon: RunningDaemon, secret: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub().Execute(request(), metadata=auth(secret), timeout=10)
    return err.value


def kid_of(secret: str) -> str:
    kid = jwt.get_unverified_header(secret)["kid"]
    assert isinstance(kid, str)
    return kid


def keys_by_kid(daemon: RunningDaemon) -> dict[str, dict[str, Any]]:
    return {k["kid"]: k for k in daemon.admin("list_signing_keys")["keys"]}


def test_rotate_then_retire(daemon: RunningDaemon) -> None:
    old_secret = daemon.issue("alice")
    old_kid = kid_of(old_secret)
    with structlog.testing.capture_logs() as logs:
        rotated = admin(daemon, "rotate-signing-key")
    assert rotated.returncode == 0, rotated.stderr
    new_kid = rotated.stdout.split()[0]
    assert new_kid > old_kid
    # The journal's audit record names the new key (the audit table's has no target).
    [record] = [r for r in logs if r["event"] == "signing_key.rotated"]
    assert (record["audit"], record["kid"], record["previous"]) == (True, new_kid, old_kid)
    assert f"retire-signing-key {old_kid}" in rotated.stderr

    # New secrets are signed by the new key; the old one's still work.
    new_secret = daemon.issue("bob")
    assert kid_of(new_secret) == new_kid
    assert served(daemon, old_secret) and served(daemon, new_secret)
    keys = keys_by_kid(daemon)
    assert keys[old_kid]["current"] is False and keys[old_kid]["active_clients"] == 1
    assert keys[new_kid]["current"] is True and keys[new_kid]["active_clients"] == 1
    clients = {c["name"]: c for c in daemon.admin("list_clients")["clients"]}
    assert (clients["alice"]["kid"], clients["bob"]["kid"]) == (old_kid, new_kid)

    # alice's secret was verified a moment ago (the Authenticator caches that); the
    # retirement refuses it on its very next request all the same.
    assert served(daemon, old_secret)
    retired = admin(daemon, "retire-signing-key", old_kid)
    assert retired.returncode == 0, retired.stderr
    assert f"retired {old_kid}" in retired.stdout and "1 active client," in retired.stdout
    error = refusal(daemon, old_secret)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "retired key" in (error.details() or "")
    assert served(daemon, new_secret)

    table = admin(daemon, "list-signing-keys")
    assert table.returncode == 0, table.stderr
    rows = [line.split() for line in table.stdout.splitlines()[1:]]
    assert [(r[0], r[3], r[4]) for r in rows] == [
        (old_kid, "retired", "1"),
        (new_kid, "current", "1"),
    ]

    audit = [(e["op"], e["target"], e["outcome"]) for e in daemon.admin("audit", {})["entries"]]
    assert ("rotate_signing_key", None, "ok") in audit
    assert ("retire_signing_key", old_kid, "ok") in audit


def test_retiring_the_current_or_only_key_is_refused(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    only = kid_of(secret)
    refused = admin(daemon, "retire-signing-key", only)
    assert refused.returncode == 1 and refused.stdout == ""
    assert f"the signing key {only} is the current and only one" in refused.stderr
    assert "vibectl-admin rotate-signing-key" in refused.stderr

    newer = admin(daemon, "rotate-signing-key").stdout.split()[0]
    current = admin(daemon, "retire-signing-key", newer)
    assert current.returncode == 1 and "is the current one" in current.stderr
    unknown = admin(daemon, "retire-signing-key", "20200101T000000Z-000000")
    assert unknown.returncode == 1 and "no signing key has the kid" in unknown.stderr
    malformed = admin(daemon, "retire-signing-key", "alice")
    assert malformed.returncode == 2 and "is not a kid" in malformed.stderr

    # Nothing was retired: the secret still works, and every refusal is audited.
    assert served(daemon, secret)
    assert {k: v["retired"] for k, v in keys_by_kid(daemon).items()} == {
        only: False,
        newer: False,
    }
    outcomes = [
        (e["target"], e["outcome"])
        for e in daemon.admin("audit", {})["entries"]
        if e["op"] == "retire_signing_key"
    ]
    assert outcomes == [
        (only, "failed"),
        (newer, "failed"),
        ("20200101T000000Z-000000", "failed:not_found"),
        ("alice", "failed:bad_request"),
    ]


def test_retirement_outlives_a_restart(start_daemon: Callable[..., RunningDaemon]) -> None:
    first = start_daemon()
    old_secret = first.issue("alice")
    old_kid = kid_of(old_secret)
    new_kid = first.admin("rotate_signing_key")["kid"]
    new_secret = first.issue("bob")
    first.admin("retire_signing_key", {"target": old_kid})
    state_dir = first.config.state_dir
    first.stop()

    second = start_daemon(state_dir=state_dir)
    assert refusal(second, old_secret).code() == grpc.StatusCode.UNAUTHENTICATED
    assert served(second, new_secret)
    assert kid_of(second.issue("carol")) == new_kid
    keys = keys_by_kid(second)
    assert keys[old_kid]["retired"] is True and keys[new_kid]["current"] is True
    assert keys[new_kid]["active_clients"] == 2
    assert (state_dir / "signing-keys" / "retired" / f"{old_kid}.pem").exists()


def test_retiring_a_key_cancels_the_open_streams_it_signed(daemon: RunningDaemon) -> None:
    old_secret = daemon.issue("alice")
    old_kid = kid_of(old_secret)
    daemon.admin("rotate_signing_key")
    stream = daemon.stub().StreamExecute(
        request("chunks:1000", model="faults"), metadata=auth(old_secret), timeout=30
    )
    assert next(stream).text_chunk == "c0 "
    replies: list[dict[str, Any]] = []
    retire = threading.Thread(
        target=lambda: replies.append(daemon.admin("retire_signing_key", {"target": old_kid}))
    )
    retire.start()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    retire.join(5)
    assert replies and replies[0]["cancelled_calls"] == 1
    # UNAUTHENTICATED, unless the cancel lands while gRPC itself is writing a chunk.
    assert err.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED)
    assert time.monotonic() - started < 5


def test_clients_of_unknown_key_are_counted_apart(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    first = start_daemon()
    legacy = first.issue("alice")
    first.issue("bob")
    state_dir = first.config.state_dir
    first.stop()
    # As the schema migration leaves a client issued by a vibectld that did not
    # record kids.
    db = sqlite3.connect(state_dir / "registry.db")
    with db:
        db.execute("UPDATE clients SET kid = NULL WHERE name = 'alice'")
    db.close()

    second = start_daemon(state_dir=state_dir)
    assert served(second, legacy)  # an unknown kid is only unknown to the registry
    listing = second.admin("list_signing_keys")
    assert listing["unknown_kid_clients"] == 1
    assert [k["active_clients"] for k in listing["keys"]] == [1]
    table = admin(second, "list-signing-keys")
    assert table.stdout.splitlines()[-1].split() == ["unknown", "-", "-", "1"]
    assert "clients issued by an older vibectld" in table.stderr


# -- TLS renewal: the server certificate under the same CA, or a new CA -----------------


class User:
    """One user's vibectl (a real process) with its own configuration directory."""

    def __init__(self, home: Path) -> None:
        self.env = {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(home),
            "VIBECTL_CONFIG_DIR": str(home / "vibectl"),
            "LLM_USER_PATH": str(home / "llm"),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "vibectl"), *args], capture_output=True, text=True, env=self.env, timeout=120
        )


def test_a_renewed_server_certificate_keeps_every_pin(
    daemon: RunningDaemon, tmp_path: Path
) -> None:
    user = User(tmp_path / "home")
    configured = user.run(
        "setup-proxy", "configure", daemon.admin("issue_client", {"name": "alice"})["url"]
    )
    assert configured.returncode == 0, configured.stderr
    before = fetch_chain("127.0.0.1", daemon.port)

    # The documented renewal: remove the server certificate, reload; the daemon issues
    # a new one from the same CA.
    tls = daemon.config.state_dir / "tls"
    (tls / "server.pem").unlink()
    (tls / "server.key").unlink()
    assert admin(daemon, "reload", "--wait").returncode == 0
    after = fetch_chain("127.0.0.1", daemon.port)
    assert after[0] != before[0] and after[-1] == before[-1]

    # The user changes nothing: the pinned CA still verifies the server.
    asked = user.run("ask", "--no-stream", "still there?")
    assert asked.returncode == 0, asked.stderr


def test_a_new_ca_needs_a_new_url_with_its_pin(daemon: RunningDaemon, tmp_path: Path) -> None:
    user = User(tmp_path / "home")
    old_url = daemon.admin("issue_client", {"name": "alice"})["url"]
    assert user.run("setup-proxy", "configure", old_url).returncode == 0
    old_pin = parse_url(old_url).ca_sha256
    assert old_pin

    # The documented replacement: move the CA aside and reload; a new CA and server
    # certificate are created and served from the next handshake on.
    tls = daemon.config.state_dir / "tls"
    shutil.move(tls, tls.with_name("tls.old"))
    assert admin(daemon, "reload", "--wait").returncode == 0
    new_pin = daemon.admin("show_ca")["sha256"]
    assert new_pin and new_pin != old_pin

    # The user's saved CA no longer verifies the server, and the old URL's pin is
    # refused with nothing saved.
    # The TLS handshake fails, and vibectl names the pin that no longer matches (exit 4).
    stale = user.run("ask", "--no-stream", "hello")
    assert stale.returncode == 4 and "does not match the CA pinned" in stale.stderr, stale.stderr
    # vibectld(8) tells the operator what their users will see: this very answer.
    replacing = " ".join(
        " ".join(Page.load("vibectld.8").subsections("TLS")["Replacing the CA"]).split()
    )
    assert "exit 4" in replacing and "the secret was not sent" in replacing, replacing
    assert "unreachable" not in replacing, replacing
    again = user.run("setup-proxy", "configure", old_url)
    assert again.returncode == 4 and "does not match" in again.stderr

    # The secret itself is still good (it is signed by a signing key, not the CA): the
    # same URL with the new pin works, as does a newly issued URL.
    new_url = old_url.replace(old_pin, new_pin)
    configured = user.run("setup-proxy", "configure", new_url)
    assert configured.returncode == 0, configured.stderr
    assert user.run("ask", "--no-stream", "hello").returncode == 0
    assert parse_url(daemon.admin("issue_client", {"name": "bob"})["url"]).ca_sha256 == new_pin


def test_a_key_retired_while_a_client_is_issued(
    daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one interleaving in which issue_client cannot sign with the kid it recorded:
    # a rotation and a retirement while the registry writes the new client.
    signing, registry = daemon.runtime.signing, daemon.runtime.registry
    write = registry.issue

    def issue_then_retire(**kwargs: Any) -> Any:
        record = write(**kwargs)
        signing.rotate()
        signing.retire(kwargs["kid"])
        return record

    monkeypatch.setattr(registry, "issue", issue_then_retire)
    failed = admin(daemon, "issue-client", "alice")
    assert failed.returncode == 1 and failed.stdout == ""
    assert "was retired before this secret was signed" in failed.stderr
    [record] = registry.clients()
    assert f"vibectl-admin revoke-client {record.id}" in failed.stderr
