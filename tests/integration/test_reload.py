"""Reload (vibectl-admin reload, SIGHUP) and the systemd notification protocol."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningDaemon, short_tmpdir
from tests.conftest import admin_cli as admin
from tests.integration.conftest import write
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl.tls_pin import fetch_chain

BIN = Path(sys.executable).parent


def base_config(tmp: Path, sock_dir: Path, **extra: Any) -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:0", "name": "reloadable"},
        "admin": {"socket": str(sock_dir / "admin.sock")},
        "state_dir": str(tmp / "state"),
        "models": {"default": "echo"},
        "logging": {"level": "warning", "format": "console"},
        **extra,
    }


def info(daemon: RunningDaemon, secret: str) -> pb.GetServerInfoResponse:
    reply: pb.GetServerInfoResponse = daemon.stub().GetServerInfo(
        pb.GetServerInfoRequest(), metadata=[("authorization", f"Bearer {secret}")], timeout=10
    )
    return reply


def test_reload_applies_new_limits_and_models(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    raw = base_config(tmp_path, sock_dir, limits={"requests_per_minute": 10})
    daemon, path = from_file(raw)
    secret = daemon.issue("alice")
    assert info(daemon, secret).limits.max_requests_per_minute == 10
    raw["limits"] = {"requests_per_minute": 3}
    raw["models"] = {"default": "echo", "aliases": {"quick": "echo"}}
    write(path, raw)
    out = admin(daemon, "reload", "--wait")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reloaded"
    after = info(daemon, secret)
    assert after.limits.max_requests_per_minute == 3
    assert after.model_aliases["quick"] == "echo"


def test_a_broken_config_is_rejected_and_the_old_one_keeps_serving(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    raw = base_config(tmp_path, sock_dir, limits={"requests_per_minute": 10})
    daemon, path = from_file(raw)
    secret = daemon.issue("alice")
    path.write_text("limits: {requests_per_minute: 5}\nbogus_key: 1\n")
    out = admin(daemon, "reload", "--wait")
    assert out.returncode == 1
    assert "bogus_key" in out.stderr and "old one keeps serving" in out.stderr
    assert info(daemon, secret).limits.max_requests_per_minute == 10
    assert "last reload rejected" in daemon.daemon._status_line()


def test_restart_only_settings_are_reported_not_applied(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    raw = base_config(tmp_path, sock_dir)
    daemon, path = from_file(raw)
    address = daemon.runtime.grpc_address
    raw["server"] = {"listen": "127.0.0.1:1", "name": "reloadable"}
    write(path, raw)
    out = admin(daemon, "reload", "--wait")
    assert out.returncode == 0 and "restart vibectld to apply" in out.stderr
    assert daemon.runtime.grpc_address == address
    assert daemon.runtime.config.server.listen == "127.0.0.1:0"


def test_a_larger_request_size_needs_a_restart_a_smaller_one_does_not(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    """gRPC's receive limit is fixed at start: raising server.max_request_bytes above
    its value then is named and kept; lowering it, and raising it back, are applied."""
    server = {"listen": "127.0.0.1:0", "name": "reloadable", "max_request_bytes": 100_000}
    raw = base_config(tmp_path, sock_dir, server=server)
    daemon, path = from_file(raw)

    def reload_to(size: int) -> list[str]:
        raw["server"]["max_request_bytes"] = size
        write(path, raw)
        out = admin(daemon, "--json", "reload", "--wait")
        assert out.returncode == 0, out.stderr
        notes: list[str] = json.loads(out.stdout)["restart_needed"]
        return notes

    def applied() -> int:
        return daemon.runtime.generation.config.server.max_request_bytes

    assert reload_to(200_000) == ["server.max_request_bytes changed: restart vibectld to apply"]
    assert applied() == 100_000
    assert (reload_to(50_000), applied()) == ([], 50_000)
    assert (reload_to(100_000), applied()) == ([], 100_000)


def test_reload_picks_up_a_reissued_server_certificate(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    daemon, _ = from_file(base_config(tmp_path, sock_dir))
    before = fetch_chain("127.0.0.1", daemon.port)
    (tmp_path / "state" / "tls" / "server.pem").unlink()
    assert admin(daemon, "reload", "--wait").returncode == 0
    after = fetch_chain("127.0.0.1", daemon.port)
    assert after[0] != before[0], "the new leaf certificate is served"
    assert after[-1] == before[-1], "the CA, and so every client's pin, is unchanged"
    secret = daemon.issue("alice")
    assert info(daemon, secret).server_name == "reloadable"


class NotifySocket:
    """A NOTIFY_SOCKET as systemd provides one, to read what the daemon says."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(30)
        self.seen: list[str] = []

    def wait_for(self, field: str) -> str:
        while True:
            message = self.sock.recv(65536).decode()
            self.seen.append(message)
            if field in message.split("\n"):
                return message
            if field.endswith("=") and any(x.startswith(field) for x in message.split("\n")):
                return message

    def close(self) -> None:
        self.sock.close()


def test_notify_protocol_reload_on_sighup_and_watchdog(tmp_path: Path) -> None:
    sock_dir = short_tmpdir()
    notify = NotifySocket(sock_dir)
    raw = base_config(tmp_path, sock_dir)
    path = tmp_path / "config.yaml"
    write(path, raw)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "2000000",
    }
    proc = subprocess.Popen(
        [str(BIN / "vibectld"), "--config", str(path)],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = notify.wait_for("READY=1")
        assert "STATUS=serving on 127.0.0.1:" in ready
        assert notify.wait_for("WATCHDOG=1")
        raw["models"] = {"default": "echo", "aliases": {"after-hup": "echo"}}
        write(path, raw)
        proc.send_signal(signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        usec = [f for f in reloading.split("\n") if f.startswith("MONOTONIC_USEC=")]
        assert (
            usec
            and int(usec[0].split("=")[1]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        )
        assert notify.wait_for("READY=1")
        status = subprocess.run(
            [str(BIN / "vibectl-admin"), "--socket", str(sock_dir / "admin.sock"), "status"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert status.returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert notify.wait_for("STOPPING=1")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        for leftover in sock_dir.iterdir():
            leftover.unlink()
        sock_dir.rmdir()


# A value different from the test daemon's for every key vibectld.yaml(5) documents;
# entries' own keys (KEY[].NAME, KEY.MODEL.NAME) change with their parent.
def _every_key_changed(tmp: Path, sock_dir: Path) -> dict[str, Any]:
    tls = tmp / "state" / "tls"
    return {
        "server": {
            "listen": "127.0.0.1:1",
            "public_url": "vibectl-server://lb.example.com:443",
            "name": "renamed",
            "tls": {
                "cert_file": str(tls / "server.pem"),
                "key_file": str(tls / "server.key"),
                "client_ca_file": str(tls / "ca.pem"),
            },
            "max_request_bytes": 2048,
            "max_concurrent_calls": 1000,
            "shutdown_grace_seconds": 3,
            "workers": 2,
        },
        "admin": {"socket": str(sock_dir / "other.sock"), "group": "nogroup"},
        "state_dir": str(tmp / "state2"),
        "models": {
            "default": "fake-sync",
            "allowed": ["echo", "fake-sync"],
            "aliases": {"quick": "echo"},
            "openai_compatible": [
                {"model_id": "x", "model_name": "y", "api_base": "http://127.0.0.1:9/v1"}
            ],
            "sync_workers": 3,
            "prices": {"echo": {"input": 1.5, "output": 2.5}},
        },
        "limits": {
            "requests_per_minute": 7,
            "concurrent_requests": 2,
            "tokens_per_day": 1000,
            "max_input_chars": 5000,
            "request_timeout_seconds": 30,
            "usd_per_month": 20,
            "server_usd_per_day": 50,
        },
        "redaction": {
            "mode": "refuse",
            "detectors": ["jwt", "k8s_secret"],
            "custom": [{"name": "ticket-id", "regex": "TKT-[0-9]{6}"}],
        },
        "clients": {
            "default_expiry": "10d",
            "max_expiry": "30d",
            "issuer": "other-issuer",
            "audience": "other-audience",
        },
        "logging": {"level": "error", "format": "json"},
        "metrics": {"listen": "127.0.0.1:1"},
        # Parses; a reload keeps sqlite (no postgresql-dsn is needed to reject it).
        "storage": {"backend": "postgresql", "max_staleness": "30s", "on_stale": "refuse"},
    }


# YAML names that the loader keeps under another attribute name.
_ATTRIBUTE = {
    "clients.default_expiry": "clients.default_expiry_seconds",
    "clients.max_expiry": "clients.max_expiry_seconds",
    "storage.max_staleness": "storage.max_staleness_seconds",
}


def _value(config: Any, key: str) -> Any:
    for part in _ATTRIBUTE.get(key, key).split("."):
        config = getattr(config, part)
    return config


def test_the_man_pages_reload_statements_hold(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    """Every key vibectld.yaml(5) marks "applied" is applied by a reload; every key it
    marks "needs a restart" keeps its value and is named in the reply."""
    from tests.docs.test_config_keys import _FIRST_LINE, documented
    from vibectld.config import RESTART_TO_SWITCH
    from vibectld.config_file import parse_config

    daemon, path = from_file(base_config(tmp_path, sock_dir))
    before = daemon.runtime.generation
    raw = _every_key_changed(tmp_path, sock_dir)
    wanted = parse_config(raw, config_path=path)
    write(path, raw)
    out = admin(daemon, "--json", "reload", "--wait")
    assert out.returncode == 0, out.stderr
    notes = json.loads(out.stdout)["restart_needed"]
    after = daemon.runtime.generation
    assert after.number == before.number + 1

    leaves = {k: v for k, v in documented().items() if "[]" not in k and ".MODEL." not in k}
    wrong: list[str] = []
    named: set[str] = set()
    for key, body in sorted(leaves.items()):
        match = _FIRST_LINE.match(body)
        assert match is not None, key
        old, new, now = _value(before.config, key), _value(wanted, key), _value(after.config, key)
        assert old != new, f"{key}: the test must change it"
        restart = match.group("reload") == "needs a restart" or key in RESTART_TO_SWITCH
        if restart:
            named.add(key)
        if now != (old if restart else new):
            wrong.append(f"{key}: {'kept' if now == old else 'applied'} after reload")
    assert wrong == []
    assert sorted(notes) == sorted(f"{key} changed: restart vibectld to apply" for key in named)
    secret = daemon.issue("alice")
    reply = info(daemon, secret)
    assert (reply.server_name, reply.limits.max_requests_per_minute) == ("renamed", 7)


def test_a_new_audience_refuses_secrets_verified_under_the_old_one(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    """The cache of verified secrets belongs to one generation, so it cannot outlive it."""
    import grpc

    raw = base_config(tmp_path, sock_dir)
    daemon, path = from_file(raw)
    secret = daemon.issue("alice")
    assert info(daemon, secret).server_name == "reloadable"  # verified, and so cached
    raw["clients"] = {"audience": "another-audience"}
    write(path, raw)
    assert admin(daemon, "reload", "--wait").returncode == 0
    with pytest.raises(grpc.RpcError) as refused:
        info(daemon, secret)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert info(daemon, daemon.issue("bob")).server_name == "reloadable"


def test_a_certificate_about_to_expire_is_renewed_without_an_operator(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A daemon can run longer than its server certificate is valid: it renews it itself."""
    import datetime as dt

    from cryptography import x509

    from vibectld.pki import tls as pki_tls

    daemon, _ = from_file(base_config(tmp_path, sock_dir))
    # As if the daemon had served for almost two years: 10 days left.
    monkeypatch.setattr(pki_tls, "SERVER_VALIDITY", dt.timedelta(days=10))
    (tmp_path / "state" / "tls" / "server.pem").unlink()
    assert admin(daemon, "reload", "--wait").returncode == 0
    assert daemon.runtime.generation.tls.renewal_due()
    monkeypatch.undo()
    before = daemon.runtime.generation.number

    async def check() -> None:
        daemon.daemon.check_certificate()

    daemon.run(check())
    deadline = time.monotonic() + 10
    while daemon.runtime.generation.number == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not daemon.runtime.generation.tls.renewal_due()
    # The next handshake presents the renewed certificate.
    leaf = x509.load_der_x509_certificate(fetch_chain("localhost", daemon.port)[0])
    assert leaf.not_valid_after_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=700)
