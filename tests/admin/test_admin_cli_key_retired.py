"""How list-clients shows `key_retired`, against a real AdminServer with a stand-in route.

The real daemon sends the field (tests/integration/test_list_clients_retired.py); here the
cases a daemon does not produce on demand: an older daemon without the field, and the
field on a client that is refused anyway.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from vibectld.admin.cli import cli
from vibectld.admin.server import Caller, Route

from .helpers import StartServer


def client(name: str, status: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"01J9ZK3Q8X7M2N4P5R6S7T8{name[:3].upper()}",
        "name": name,
        "status": status,
        "created_at": "2026-01-02T03:04:05Z",
        "expires_at": "2026-04-02T03:04:05Z",
        "last_seen_at": None,
        "requests": 0,
        **fields,
    }


CLIENTS = [
    client("alice", "active", kid="k1", key_retired=True),
    client("bob", "active", kid="k2", key_retired=False),
    client("carol", "revoked", kid="k1", key_retired=True),
    client("dave", "active", kid=None, key_retired=None),
    client("erin", "active"),  # a daemon older than the field
]


@pytest.fixture
def socket_path(serve: StartServer, tmp_path: Path) -> Path:
    async def list_clients(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return {"clients": CLIENTS}

    path = tmp_path / "admin.sock"
    serve(path, {"list_clients": Route(list_clients, write=False)})
    return path


def run(path: Path, *argv: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(path), *argv], catch_exceptions=False)


def test_only_an_active_client_of_a_retired_key_is_marked(socket_path: Path) -> None:
    result = run(socket_path, "list-clients", "--all")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "ID            NAME   STATUS                CREATED           EXPIRES           "
        "LAST SEEN  REQUESTS",
        "01J9ZK3Q8X7M  alice  active (key retired)  2026-01-02 03:04  2026-04-02 03:04  "
        "never             0",
        "01J9ZK3Q8X7M  bob    active                2026-01-02 03:04  2026-04-02 03:04  "
        "never             0",
        "01J9ZK3Q8X7M  carol  revoked               2026-01-02 03:04  2026-04-02 03:04  "
        "never             0",
        "01J9ZK3Q8X7M  dave   active                2026-01-02 03:04  2026-04-02 03:04  "
        "never             0",
        "01J9ZK3Q8X7M  erin   active                2026-01-02 03:04  2026-04-02 03:04  "
        "never             0",
    ]
    assert result.stderr == (
        "alice: signed by a retired key, refused on every request; revoke each "
        "(vibectl-admin revoke-client NAME) and issue it a new secret "
        "(vibectl-admin issue-client NAME)\n"
    )


def test_json_passes_the_field_through_unchanged(socket_path: Path) -> None:
    result = run(socket_path, "--json", "list-clients")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == CLIENTS
    assert result.stderr == ""
