"""vibectl-admin against a real AdminServer whose routes imitate the daemon's ops."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from vibectld.admin import protocol
from vibectld.admin.cli import cli
from vibectld.admin.protocol import ErrorCode
from vibectld.admin.server import AdminError, Caller, Route

from .helpers import StartServer, cli_as_nobody, needs_root

URL = "vibectl-server://secret-alice@bastion.example.com:50051?ca-sha256=ab12"
CLIENTS: list[dict[str, Any]] = [
    {
        "id": "01J9ZK3Q8X7M2N4P5R6S7T8V9W",
        "name": "alice",
        "status": "active",
        "created_at": "2025-01-02T03:04:05Z",
        "expires_at": "2025-04-02T03:04:05+00:00",
        "last_seen_at": None,
        "requests": 0,
        "revoked_at": None,
        "revoke_reason": None,
        "note": None,
        "models": None,
        "rpm": 60,
        "concurrency": 4,
        "tokens_per_day": None,
    },
    {
        "id": "01J9ZK3Q8X7M2N4P5R6S7T8V9X",
        "name": "bob-the-builder",
        "status": "revoked",
        "created_at": "2025-01-01T00:00:00Z",
        "expires_at": "2026-01-01T00:00:00Z",
        "last_seen_at": "2025-02-03T10:11:12.5Z",
        "requests": 1234,
        "revoked_at": "2025-03-01T00:00:00Z",
        "revoke_reason": "left",
        "note": "ticket 7",
        "models": ["gpt-4o"],
        "rpm": None,
        "concurrency": None,
        "tokens_per_day": 1000,
    },
]


class FakeDaemon:
    """Routes with the shapes of the real ops; records the args they receive."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.ca_pem: str | None = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"

    def routes(self) -> dict[str, Route]:
        return {
            "issue_client": Route(self.issue_client, write=True),
            "list_clients": Route(self.list_clients, write=False),
            "revoke_client": Route(self.revoke_client, write=True),
            "show_ca": Route(self.show_ca, write=False),
            "status": Route(self.status, write=False),
        }

    async def issue_client(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("issue_client", args))
        if args["name"] == "taken":
            raise AdminError(ErrorCode.CONFLICT, "a client named 'taken' already exists")
        if args["expires"] == "9y":
            raise AdminError(ErrorCode.BAD_REQUEST, "--expires 9y is longer than the 2y maximum")
        return {
            "url": URL,
            "id": "01J9ZK3Q8X7M2N4P5R6S7T8V9W",
            "name": args["name"],
            "expires_at": "2025-04-02T03:04:05Z",
        }

    async def list_clients(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("list_clients", args))
        return {"clients": CLIENTS if args["all"] else CLIENTS[:1]}

    async def revoke_client(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("revoke_client", args))
        if args["target"] != "alice":
            raise AdminError(ErrorCode.NOT_FOUND, f"no client named or with id {args['target']!r}")
        return {"id": CLIENTS[0]["id"], "name": "alice", "revoked_at": "2025-03-01T00:00:00Z"}

    async def show_ca(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return {"pem": self.ca_pem}

    async def status(self, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": "0.1.0",
            "pid": 4242,
            "uptime_seconds": 93784.5,
            "listeners": {"grpc": "0.0.0.0:50051", "admin": "/run/vibectld/admin.sock"},
            "default_model": "gpt-4o-mini",
            "models": ["gpt-4o-mini", "local-qwen"],
            "clients": {"active": 3, "expired": 1, "revoked": 2},
            "in_flight": 0,
            "usd_today": 12.5,
            "server_usd_per_day": 50.0,
        }


@pytest.fixture
def daemon(serve: StartServer, tmp_path: Path) -> tuple[FakeDaemon, Path]:
    fake = FakeDaemon()
    path = tmp_path / "admin.sock"
    serve(path, fake.routes())
    return fake, path


def run(path: Path, *argv: str) -> Result:
    return CliRunner().invoke(cli, ["--socket", str(path), *argv], catch_exceptions=False)


def test_issue_client_prints_exactly_the_url(daemon: tuple[FakeDaemon, Path]) -> None:
    fake, path = daemon
    result = run(path, "issue-client", "alice")
    assert result.exit_code == 0, result.output
    assert result.stdout == URL + "\n"
    assert "give this URL to alice; it is shown only once" in result.stderr
    assert fake.calls == [
        (
            "issue_client",
            {
                "name": "alice",
                "expires": None,
                "models": None,
                "rpm": None,
                "concurrency": None,
                "tokens_per_day": None,
                "usd_per_month": None,
                "note": None,
            },
        )
    ]


def test_issue_client_passes_every_option(daemon: tuple[FakeDaemon, Path]) -> None:
    fake, path = daemon
    result = run(
        path,
        "--json",
        "issue-client",
        "alice",
        "--expires",
        "1y",
        "--models",
        "gpt-4o, local-qwen,",
        "--rpm",
        "10",
        "--concurrency",
        "2",
        "--tokens-per-day",
        "5000",
        "--usd-per-month",
        "20",
        "--note",
        "ticket 7",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "url": URL,
        "id": "01J9ZK3Q8X7M2N4P5R6S7T8V9W",
        "name": "alice",
        "expires_at": "2025-04-02T03:04:05Z",
    }
    assert fake.calls[-1][1] == {
        "name": "alice",
        "expires": "1y",
        "models": ["gpt-4o", "local-qwen"],
        "rpm": 10,
        "concurrency": 2,
        "tokens_per_day": 5000,
        "usd_per_month": 20.0,
        "note": "ticket 7",
    }


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--expires", "10x"], "use a number and a unit, one of m (minutes), h, d, w, y"),
        (["--expires", "0d"], "must be longer than zero"),
        (["--rpm", "0"], "--rpm"),
        (["--usd-per-month", "-5"], "--usd-per-month"),
        (["--usd-per-month", "a lot"], "is not a number of US dollars"),
        (["--models", " , "], "give one or more model names"),
    ],
)
def test_issue_client_usage_errors(
    daemon: tuple[FakeDaemon, Path], argv: list[str], expected: str
) -> None:
    fake, path = daemon
    result = run(path, "issue-client", "alice", *argv)
    assert result.exit_code == 2
    assert expected in result.stderr
    assert result.stdout == ""
    assert fake.calls == []  # Rejected before reaching the daemon.


def test_server_side_errors_map_to_exit_codes(daemon: tuple[FakeDaemon, Path]) -> None:
    _, path = daemon
    conflict = run(path, "issue-client", "taken")
    assert conflict.exit_code == 1
    assert conflict.stderr == "vibectl-admin: a client named 'taken' already exists\n"
    assert conflict.stdout == ""

    bad = run(path, "issue-client", "alice", "--expires", "9y")
    assert bad.exit_code == 2
    assert bad.stderr == "vibectl-admin: --expires 9y is longer than the 2y maximum\n"

    missing = run(path, "revoke-client", "ghost")
    assert missing.exit_code == 1
    assert missing.stderr == "vibectl-admin: no client named or with id 'ghost'\n"


def test_list_clients_table(daemon: tuple[FakeDaemon, Path]) -> None:
    fake, path = daemon
    result = run(path, "list-clients", "--all")
    assert result.exit_code == 0, result.output
    assert fake.calls == [("list_clients", {"all": True})]
    assert result.stdout.splitlines() == [
        "ID            NAME             STATUS   CREATED           EXPIRES           "
        "LAST SEEN         REQUESTS",
        "01J9ZK3Q8X7M  alice            active   2025-01-02 03:04  2025-04-02 03:04  "
        "never                    0",
        "01J9ZK3Q8X7M  bob-the-builder  revoked  2025-01-01 00:00  2026-01-01 00:00  "
        "2025-02-03 10:11      1234",
    ]
    default = run(path, "list-clients")
    assert fake.calls[-1] == ("list_clients", {"all": False})
    assert len(default.stdout.splitlines()) == 2


def test_list_clients_json(daemon: tuple[FakeDaemon, Path]) -> None:
    _, path = daemon
    result = run(path, "--json", "list-clients", "--all")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == CLIENTS


def test_revoke_client(daemon: tuple[FakeDaemon, Path]) -> None:
    fake, path = daemon
    result = run(path, "revoke-client", "alice", "--reason", "left the team")
    assert result.exit_code == 0, result.output
    assert fake.calls == [("revoke_client", {"target": "alice", "reason": "left the team"})]
    assert result.stdout == (
        "revoked alice (id 01J9ZK3Q8X7M2N4P5R6S7T8V9W); their next request will be refused\n"
    )
    as_json = run(path, "--json", "revoke-client", "alice")
    assert json.loads(as_json.stdout)["revoked_at"] == "2025-03-01T00:00:00Z"
    assert fake.calls[-1] == ("revoke_client", {"target": "alice", "reason": None})


def test_show_ca(daemon: tuple[FakeDaemon, Path]) -> None:
    fake, path = daemon
    assert run(path, "show-ca").stdout == fake.ca_pem
    fake.ca_pem = None
    result = run(path, "show-ca")
    assert (result.exit_code, result.stdout) == (0, "")
    assert json.loads(run(path, "--json", "show-ca").stdout) == {"pem": None}


def test_status(daemon: tuple[FakeDaemon, Path]) -> None:
    _, path = daemon
    result = run(path, "status")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "version:       0.1.0",
        "pid:           4242",
        "uptime:        1d 2h 3m 4s",
        "grpc listener: 0.0.0.0:50051",
        "admin socket:  /run/vibectld/admin.sock",
        "default model: gpt-4o-mini",
        "models:        gpt-4o-mini, local-qwen",
        "clients:       3 active, 1 expired, 2 revoked",
        "in flight:     0",
        "spend today:   $12.50 of $50.00 (UTC day; $37.50 left)",
    ]
    assert json.loads(run(path, "--json", "status").stdout)["listeners"]["grpc"] == (
        "0.0.0.0:50051"
    )


def test_unreachable_daemon_exits_69(tmp_path: Path) -> None:
    path = tmp_path / "nothing-here.sock"
    result = run(path, "status")
    assert result.exit_code == 69
    assert result.stdout == ""
    assert result.stderr == (
        f"vibectl-admin: cannot reach vibectld at {path}: no such socket; is vibectld "
        "running? try: systemctl status vibectld\n"
    )


def test_socket_from_environment(
    daemon: tuple[FakeDaemon, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, path = daemon
    monkeypatch.setenv("VIBECTLD_ADMIN_SOCKET", str(path))
    result = CliRunner().invoke(cli, ["status"], catch_exceptions=False)
    assert result.exit_code == 0 and "pid:" in result.stdout


def test_no_unreleased_commands() -> None:
    assert sorted(cli.list_commands(click.Context(cli))) == [
        "audit",
        "issue-client",
        "list-clients",
        "list-signing-keys",
        "reload",
        "retire-signing-key",
        "revoke-client",
        "rotate-signing-key",
        "show-ca",
        "status",
        "storage",
        "update-client",
        "usage",
    ]


def _console_script() -> list[str]:
    script = Path(sys.executable).parent / "vibectl-admin"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vibectld.admin.cli"]


def test_console_script_in_a_subprocess(daemon: tuple[FakeDaemon, Path]) -> None:
    _, path = daemon
    env = {k: v for k, v in os.environ.items() if k != "VIBECTLD_ADMIN_SOCKET"}
    proc = subprocess.run(
        [*_console_script(), "--socket", str(path), "issue-client", "alice", "--expires", "90d"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == URL + "\n"

    module = subprocess.run(
        [sys.executable, "-m", "vibectld.admin.cli", "--socket", str(path), "--json", "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert module.returncode == 0, module.stderr
    assert json.loads(module.stdout)["pid"] == 4242

    missing = subprocess.run(
        [*_console_script(), "--socket", str(path.parent / "gone.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 69
    assert missing.stderr.startswith("vibectl-admin: cannot reach vibectld at ")
    assert "Traceback" not in missing.stderr


@needs_root
def test_socket_permission_denied_exits_77(serve: StartServer, shared_dir: Path) -> None:
    private = shared_dir / "private"
    private.mkdir(mode=0o700)
    path = private / "admin.sock"
    serve(path, FakeDaemon().routes())
    proc = cli_as_nobody("--socket", str(path), "status")
    assert proc.returncode == 77, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == (
        f"vibectl-admin: permission denied opening {path}: ask an admin to add you to the "
        "vibectld-admin group (then log in again), or use --socket\n"
    )


@needs_root
def test_refused_write_exits_77(serve: StartServer, shared_dir: Path) -> None:
    path = shared_dir / "admin.sock"
    fake = FakeDaemon()
    serve(path, fake.routes(), group="vibectld-admin")
    path.chmod(0o666)
    status = cli_as_nobody("--socket", str(path), "status")
    assert status.returncode == 0, status.stderr  # Reading is open to anyone who connects.
    proc = cli_as_nobody("--socket", str(path), "issue-client", "mallory")
    assert proc.returncode == 77
    assert proc.stdout == ""
    assert "may not issue_client: add the user to the 'vibectld-admin' group" in proc.stderr
    assert fake.calls == []


def test_request_too_large_is_a_usage_error(daemon: tuple[FakeDaemon, Path]) -> None:
    _, path = daemon
    result = run(path, "issue-client", "alice", "--note", "x" * protocol.MAX_LINE_BYTES)
    assert result.exit_code == 2
    assert "larger than" in result.stderr
