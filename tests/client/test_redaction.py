"""`vibectl ask` replaces secrets before a prompt leaves, and says how many (a real process).

The `echo` model answers with the prompt it received, so what arrived is what it prints.
The redacted request goes through a real vibectld; the requests sent as is go in direct
mode, which no server policy touches.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.client.test_cli import User, issue_url
from tests.conftest import RunningDaemon

PASSWORD = "cGFzc3dvcmQtMTIzNDU2"
TOKEN = "ZXlKaGJHY2lPaUpTVXpJMU5pSjkuZXlKemRXSWlPaUpoSW4wLnNpZw=="
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQifQ.c2lnbmF0dXJlLXZhbHVl"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
SECRET_YAML = f"""\
apiVersion: v1
data:
  password: {PASSWORD}
  token: {TOKEN}
  username: YWRtaW4=
kind: Secret
metadata:
  creationTimestamp: "2026-11-02T10:00:00Z"
  name: db-creds
  namespace: default
  resourceVersion: "918273"
  uid: 3f1c2a4e-8b7d-4c1e-9f0a-2b3c4d5e6f70
type: Opaque
"""
LOGS = f"2026-11-02T10:00:03Z DEBUG Authorization: Bearer {JWT} key={AWS_ID}\n"
VALUES = (PASSWORD, TOKEN, "YWRtaW4=", JWT, AWS_ID)
NOTICE = re.compile(r"vibectl: redacted (\d+) secrets \(([^)]*)\) before sending; --no-redact")


@pytest.fixture
def user(tmp_path: Path) -> User:
    return User(tmp_path / "home")


def test_a_piped_secret_arrives_redacted_and_the_user_is_told(
    daemon: RunningDaemon, user: User
) -> None:
    assert user.run("setup-proxy", "configure", issue_url(daemon, "alice")).returncode == 0
    out = user.run("ask", "--system", f"context: {LOGS}", stdin=SECRET_YAML)
    assert out.returncode == 0, out.stderr
    arrived = json.loads(out.stdout)
    for value in VALUES:
        assert value not in out.stdout and value not in out.stderr
    assert arrived["prompt"].count("[REDACTED:k8s_secret]") == 3
    assert "uid: 3f1c2a4e-8b7d-4c1e-9f0a-2b3c4d5e6f70" in arrived["prompt"]
    assert 'resourceVersion: "918273"' in arrived["prompt"]
    assert "Bearer [REDACTED:jwt] key=[REDACTED:aws_access_key_id]" in arrived["system"]
    notice = NOTICE.search(out.stderr)
    assert notice is not None, out.stderr
    assert notice.group(1) == "5"
    assert notice.group(2) == "aws_access_key_id 1, jwt 1, k8s_secret 3"


def test_no_redact_sends_the_prompt_as_is(user: User) -> None:
    out = user.run("--no-proxy", "ask", "--model", "echo", "--no-redact", stdin=SECRET_YAML)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == SECRET_YAML
    assert "redacted" not in out.stderr


def test_direct_mode_redacts_too(user: User) -> None:
    out = user.run("--no-proxy", "ask", "--model", "echo", stdin=SECRET_YAML)
    assert out.returncode == 0, out.stderr
    assert PASSWORD not in out.stdout and "[REDACTED:k8s_secret]" in out.stdout
    assert "redacted 3 secrets (k8s_secret 3)" in out.stderr


def test_the_config_key_turns_it_off(user: User) -> None:
    config = user.config_dir / "client" / "config.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("version: 1\nredaction:\n  enabled: false\n")
    out = user.run("--no-proxy", "ask", "--model", "echo", stdin=SECRET_YAML)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == SECRET_YAML
    config.write_text("version: 1\nredaction:\n  enabled: maybe\n")
    bad = user.run("--no-proxy", "ask", "--model", "echo", stdin=SECRET_YAML)
    assert bad.returncode == 3 and "redaction.enabled: must be true or false" in bad.stderr


def test_a_prompt_of_only_secrets_is_still_sent(user: User) -> None:
    out = user.run("--no-proxy", "ask", "--model", "echo", JWT)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == "[REDACTED:jwt]"
    assert "redacted 1 secret (jwt 1)" in out.stderr
