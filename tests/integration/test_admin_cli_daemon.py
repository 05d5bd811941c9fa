"""`vibectl-admin` as a real process against a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import RunningDaemon
from tests.conftest import admin_cli as admin
from vibectl.proxy_url import parse

BIN = Path(sys.executable).parent


def test_issue_prints_only_the_url_with_the_ca_pin(daemon: RunningDaemon) -> None:
    out = admin(daemon, "issue-client", "alice", "--expires", "1y")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1
    url = parse(lines[0])
    assert (url.host, url.port) == ("127.0.0.1", daemon.port)
    assert url.ca_sha256 == daemon.runtime.tls.ca_sha256
    assert url.secret and url.secret not in out.stderr


def test_issue_json_and_expiry(daemon: RunningDaemon) -> None:
    out = admin(daemon, "--json", "issue-client", "bob", "--expires", "30m", "--note", "ci")
    data = json.loads(out.stdout)
    assert set(data) >= {"url", "id", "name", "expires_at"} and data["name"] == "bob"


def test_revoked_client_shows_as_revoked(daemon: RunningDaemon) -> None:
    assert admin(daemon, "issue-client", "alice").returncode == 0
    out = admin(daemon, "revoke-client", "alice", "--reason", "left the team")
    assert out.returncode == 0 and "revoked alice" in out.stdout
    listed = json.loads(admin(daemon, "--json", "list-clients", "--all").stdout)
    assert [(c["name"], c["status"]) for c in listed] == [("alice", "revoked")]
    assert listed[0]["revoke_reason"] == "left the team"
    assert json.loads(admin(daemon, "--json", "list-clients").stdout) == []


def test_errors_have_clear_messages_and_exit_codes(daemon: RunningDaemon) -> None:
    assert admin(daemon, "issue-client", "alice").returncode == 0
    dup = admin(daemon, "issue-client", "alice")
    assert dup.returncode == 1 and "alice" in dup.stderr and "revoke it first" in dup.stderr
    unknown = admin(daemon, "revoke-client", "nobody")
    assert unknown.returncode == 1 and "nobody" in unknown.stderr
    bad = admin(daemon, "issue-client", "carol", "--expires", "soon")
    assert bad.returncode == 2 and "30m" in bad.stderr
    too_long = admin(daemon, "issue-client", "carol", "--expires", "3y")
    assert too_long.returncode == 2 and "max_expiry" in too_long.stderr
    bad_model = admin(daemon, "issue-client", "carol", "--models", "echo,gpt-9")
    assert bad_model.returncode == 2 and "gpt-9" in bad_model.stderr
    bad_name = admin(daemon, "issue-client", "no spaces")
    assert bad_name.returncode == 2
    # The daemon kept serving through all of that.
    assert admin(daemon, "issue-client", "carol").returncode == 0


def test_show_ca_and_status(daemon: RunningDaemon) -> None:
    assert admin(daemon, "show-ca").stdout == daemon.ca_pem.decode()
    admin(daemon, "issue-client", "alice")
    status = json.loads(admin(daemon, "--json", "status").stdout)
    assert status["listeners"]["grpc"] == f"127.0.0.1:{daemon.port}"
    assert status["clients"] == {"active": 1, "expired": 0, "revoked": 0}
    assert "echo" in status["models"] and status["in_flight"] == 0
    human = admin(daemon, "status").stdout
    assert "echo" in human


def test_unreachable_daemon_is_exit_69(tmp_path: Path) -> None:
    out = subprocess.run(
        [str(BIN / "vibectl-admin"), "--socket", str(tmp_path / "none.sock"), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 69 and "systemctl status vibectld" in out.stderr
