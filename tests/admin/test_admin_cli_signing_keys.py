"""vibectl-admin's signing-key commands against a real AdminServer with stand-in routes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from vibectld.admin.cli import cli
from vibectld.admin.protocol import ErrorCode
from vibectld.admin.server import AdminError, Caller, Route

from .helpers import StartServer

OLD, NEW = "20260101T000000Z-aaaaaa", "20260301T120000Z-bbbbbb"
KEYS: dict[str, Any] = {
    "keys": [
        {
            "kid": "20251001T000000Z-cccccc",
            "created_at": "2025-10-01T00:00:00Z",
            "current": False,
            "retired": True,
            "active_clients": 1,
        },
        {
            "kid": OLD,
            "created_at": "2026-01-01T00:00:00Z",
            "current": False,
            "retired": False,
            "active_clients": 12,
        },
        {
            "kid": NEW,
            "created_at": "2026-03-01T12:00:00Z",
            "current": True,
            "retired": False,
            "active_clients": 3,
        },
    ],
    "unknown_kid_clients": 2,
}


class FakeKeys:
    """The signing-key ops with the daemon's result shapes and refusals."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.listing: dict[str, Any] = KEYS

    def routes(self) -> dict[str, Route]:
        return {
            "list_signing_keys": Route(self.list_keys, write=False),
            "retire_signing_key": Route(self.retire, write=True),
            "rotate_signing_key": Route(self.rotate, write=True),
        }

    async def list_keys(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("list_signing_keys", args))
        return self.listing

    async def rotate(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("rotate_signing_key", args))
        return {"kid": NEW, "created_at": "2026-03-01T12:00:00Z", "previous": OLD}

    async def retire(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("retire_signing_key", args))
        if args["target"] == NEW:
            raise AdminError(
                ErrorCode.FAILED,
                f"the signing key {NEW} is the current one, which signs new secrets; make a "
                "new one first with: vibectl-admin rotate-signing-key",
            )
        if args["target"] != OLD:
            raise AdminError(ErrorCode.NOT_FOUND, f"no signing key has the kid {args['target']!r}")
        return {"kid": OLD, "active_clients": 12, "cancelled_calls": 1, "unknown_kid_clients": 2}


@pytest.fixture
def keys(serve: StartServer, tmp_path: Path) -> tuple[FakeKeys, Path]:
    fake = FakeKeys()
    path = tmp_path / "admin.sock"
    serve(path, fake.routes())
    return fake, path


def run(path: Path, *argv: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(path), *argv], catch_exceptions=False)


def test_rotate(keys: tuple[FakeKeys, Path]) -> None:
    fake, path = keys
    result = run(path, "rotate-signing-key")
    assert result.exit_code == 0, result.output
    assert fake.calls == [("rotate_signing_key", {})]
    assert result.stdout == f"{NEW} signs new secrets from now on\n"
    assert f"vibectl-admin retire-signing-key {OLD}" in result.stderr
    as_json = json.loads(run(path, "--json", "rotate-signing-key").stdout)
    assert as_json == {"kid": NEW, "created_at": "2026-03-01T12:00:00Z", "previous": OLD}


def test_retire(keys: tuple[FakeKeys, Path]) -> None:
    fake, path = keys
    result = run(path, "retire-signing-key", OLD)
    assert result.exit_code == 0, result.output
    # "target", so the admin server's audit record names the kid.
    assert fake.calls == [("retire_signing_key", {"target": OLD})]
    assert result.stdout == (
        f"retired {OLD}: the secrets it signed are refused from now on "
        "(12 active clients, 1 running call cancelled)\n"
    )
    assert "issue those clients new secrets" in result.stderr
    assert json.loads(run(path, "--json", "retire-signing-key", OLD).stdout)["active_clients"] == 12


def test_retire_refusals_exit_1_with_the_reason(keys: tuple[FakeKeys, Path]) -> None:
    _, path = keys
    current = run(path, "retire-signing-key", NEW)
    assert current.exit_code == 1 and current.stdout == ""
    assert "is the current one" in current.stderr and "rotate-signing-key" in current.stderr
    unknown = run(path, "retire-signing-key", "20200101T000000Z-000000")
    assert unknown.exit_code == 1 and "no signing key has the kid" in unknown.stderr
    missing = run(path, "retire-signing-key")
    assert missing.exit_code == 2 and "KID" in missing.stderr


def test_list_table_counts_unknown_signers(keys: tuple[FakeKeys, Path]) -> None:
    fake, path = keys
    result = run(path, "list-signing-keys")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "KID                      CREATED           STATUS    ACTIVE CLIENTS",
        "20251001T000000Z-cccccc  2025-10-01 00:00  retired                1",
        "20260101T000000Z-aaaaaa  2026-01-01 00:00  verifies              12",
        "20260301T120000Z-bbbbbb  2026-03-01 12:00  current                3",
        "unknown                  -                 -                      2",
    ]
    assert "unknown: clients issued by an older vibectld" in result.stderr
    fake.listing = {**KEYS, "unknown_kid_clients": 0}
    assert "unknown" not in run(path, "list-signing-keys").output


def test_list_json(keys: tuple[FakeKeys, Path]) -> None:
    _, path = keys
    result = run(path, "--json", "list-signing-keys")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == KEYS
