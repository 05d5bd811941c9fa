"""list-clients says which active clients a retired signing key has locked out.

A real daemon, the real vibectl-admin: the contract's status values stay
active/expired/revoked, so the table qualifies the status and names those clients on
standard error, and --json adds key_retired.
"""

from __future__ import annotations

import json

import grpc

from tests.conftest import RunningDaemon
from tests.conftest import admin_cli as admin
from vibectl._proto import llm_proxy_pb2 as pb


def authenticates(daemon: RunningDaemon, secret: str) -> bool:
    try:
        daemon.stub().Execute(
            pb.ExecuteRequest(user_fragments=["hi"], request_id="r1"),
            metadata=[("authorization", f"Bearer {secret}")],
            timeout=10,
        )
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
        return False
    return True


def status_by_name(table: str) -> dict[str, str]:
    """NAME → STATUS cell of list-clients' table (the status may hold spaces)."""
    lines = table.splitlines()
    header = lines[0]
    name_at, status_at, created_at = (header.index(h) for h in ("NAME", "STATUS", "CREATED"))
    return {
        line[name_at:status_at].strip(): line[status_at:created_at].strip() for line in lines[1:]
    }


def test_clients_of_a_retired_key_are_marked_and_named(daemon: RunningDaemon) -> None:
    alice = daemon.issue("alice")
    rotated = daemon.admin("rotate_signing_key")
    old_kid = rotated["previous"]
    bob = daemon.issue("bob")
    assert authenticates(daemon, alice) and authenticates(daemon, bob)

    before = admin(daemon, "list-clients")
    assert before.returncode == 0, before.stderr
    assert status_by_name(before.stdout) == {"alice": "active", "bob": "active"}
    assert before.stderr == ""

    assert daemon.admin("retire_signing_key", {"target": old_kid})["active_clients"] == 1
    assert not authenticates(daemon, alice) and authenticates(daemon, bob)

    listed = admin(daemon, "--json", "list-clients")
    assert listed.returncode == 0, listed.stderr
    clients = {c["name"]: c for c in json.loads(listed.stdout)}
    # The status keeps the contract's values; the new field says what it does not.
    assert (clients["alice"]["status"], clients["alice"]["key_retired"]) == ("active", True)
    assert (clients["bob"]["status"], clients["bob"]["key_retired"]) == ("active", False)
    assert clients["alice"]["kid"] == old_kid

    shown = admin(daemon, "list-clients")
    assert shown.returncode == 0, shown.stderr
    assert status_by_name(shown.stdout) == {"alice": "active (key retired)", "bob": "active"}
    assert shown.stderr.startswith("alice: signed by a retired key, refused on every request")
    assert "vibectl-admin revoke-client NAME" in shown.stderr
    assert "vibectl-admin issue-client NAME" in shown.stderr

    # The advice works: revoked, alice is no longer marked or named, and a new secret
    # under her name authenticates.
    assert admin(daemon, "revoke-client", "alice").returncode == 0
    after = admin(daemon, "list-clients", "--all")
    assert status_by_name(after.stdout) == {"alice": "revoked", "bob": "active"}
    assert after.stderr == ""
    assert authenticates(daemon, daemon.issue("alice"))
    assert "(key retired)" not in admin(daemon, "list-clients").stdout


def test_update_client_reports_key_retired_as_list_clients_does(daemon: RunningDaemon) -> None:
    daemon.issue("alice")
    old_kid = daemon.admin("rotate_signing_key")["previous"]
    daemon.admin("retire_signing_key", {"target": old_kid})
    updated = daemon.admin("update_client", {"target": "alice", "rpm": 5})
    assert (updated["status"], updated["key_retired"]) == ("active", True)
