"""`vibectl` as a user runs it (a real process) against a real vibectld over TLS."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import select
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import RunningDaemon

BIN = Path(sys.executable).parent


class User:
    """One user's vibectl: its own config directory and llm directory."""

    def __init__(self, home: Path) -> None:
        self.config_dir = home / "vibectl"
        self.env = {
            "PATH": f"{BIN}:/usr/bin:/bin",
            "HOME": str(home),
            "VIBECTL_CONFIG_DIR": str(self.config_dir),
            "LLM_USER_PATH": str(home / "llm"),
        }

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "vibectl"), *args],
            capture_output=True,
            text=True,
            input=stdin,
            env=self.env,
            timeout=120,
        )


@pytest.fixture
def user(tmp_path: Path) -> User:
    return User(tmp_path / "home")


def issue_url(daemon: RunningDaemon, name: str, **args: object) -> str:
    url = daemon.admin("issue_client", {"name": name, **args})["url"]
    assert isinstance(url, str)
    return url


def test_one_pasted_url_then_ask(daemon: RunningDaemon, user: User) -> None:
    url = issue_url(daemon, "alice")
    out = user.run("setup-proxy", "configure", url)
    assert out.returncode == 0, out.stderr
    assert "test-server" in out.stdout and "echo" in out.stdout
    secret = url.split("://", 1)[1].split("@", 1)[0]
    assert secret not in out.stdout + out.stderr
    secret_file = user.config_dir / "client" / "server-secrets" / "127.0.0.1.key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert secret not in (user.config_dir / "client" / "config.yaml").read_text()

    asked = user.run("ask", "hello")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["prompt"] == "hello"
    piped = user.run("ask", "--no-stream", "--system", "be brief", stdin="from stdin")
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["system"] == "be brief"
    assert json.loads(piped.stdout)["prompt"] == "from stdin"


def test_schema_prints_the_json_reply(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "alice"))
    out = user.run("ask", "q", "--model", "faults", "--schema", '{"type": "object"}')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"answer": "q", "system": ""}


def test_an_altered_pin_is_refused_and_nothing_is_saved(daemon: RunningDaemon, user: User) -> None:
    url = issue_url(daemon, "alice")
    pin = url.rsplit("=", 1)[1]
    altered = url.replace(pin, ("0" if pin[0] != "0" else "1") + pin[1:])
    out = user.run("setup-proxy", "configure", altered)
    assert out.returncode == 4
    assert "does not match" in out.stderr and "nothing was saved" in out.stderr
    assert not (user.config_dir / "client").exists()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://s@host:1", "must start with vibectl-server://"),
        ("vibectl-server://secret@:50051", "no host"),
        ("vibectl-server://host:50051", "no secret"),
        ("vibectl-server://s@host:99999", "port"),
        ("vibectl-server://s@host:50051?ca-sha256=xyz", "ca-sha256"),
    ],
)
def test_bad_urls_are_usage_errors(user: User, url: str, reason: str) -> None:
    out = user.run("setup-proxy", "configure", url)
    assert out.returncode == 2 and reason in out.stderr
    assert not (user.config_dir / "client").exists()


def test_ca_bundle_instead_of_a_pin(daemon: RunningDaemon, user: User, tmp_path: Path) -> None:
    url = issue_url(daemon, "alice").split("?", 1)[0]
    not_pem = tmp_path / "bundle.txt"
    not_pem.write_text("not a certificate\n")
    bad = user.run("setup-proxy", "configure", url, "--ca-bundle", str(not_pem))
    assert bad.returncode == 2 and "PEM" in bad.stderr
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(daemon.ca_pem)
    good = user.run("setup-proxy", "configure", url, "--ca-bundle", str(bundle), "--name", "corp")
    assert good.returncode == 0, good.stderr
    assert user.run("ask", "hi").returncode == 0


def test_a_server_that_is_down_is_unavailable(user: User) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = user.run(
        "setup-proxy", "configure", f"vibectl-server://s3cr3t@127.0.0.1:{port}?ca-sha256={'a' * 64}"
    )
    assert out.returncode == 69
    assert f"cannot reach vibectld at 127.0.0.1:{port}" in out.stderr


def test_insecure_urls_need_the_flag_and_warn(user: User) -> None:
    url = "vibectl-server-insecure://s3cr3t@127.0.0.1:1"
    refused = user.run("setup-proxy", "configure", url)
    assert refused.returncode == 2 and "--insecure" in refused.stderr
    saved = user.run("setup-proxy", "configure", url, "--insecure", "--no-test", "--name", "lab")
    assert saved.returncode == 0, saved.stderr
    out = user.run("ask", "hi")
    assert "WARNING" in out.stderr and "clear text" in out.stderr


def test_revoked_secret_says_what_to_do(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "alice"))
    daemon.admin("revoke_client", {"target": "alice"})
    out = user.run("ask", "hi")
    assert out.returncode == 4
    assert "revoked" in out.stderr and "ask your vibectld admin" in out.stderr


def test_limits_are_a_recoverable_error(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "alice", rpm=1))
    assert user.run("ask", "one").returncode == 0
    out = user.run("ask", "two")
    assert out.returncode == 75 and "retry later" in out.stderr


def test_permission_denied_model(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "alice", models=["echo"]))
    out = user.run("ask", "hi", "--model", "faults")
    # The server's wording may not name the model (issue 12: unknown and denied look alike).
    assert out.returncode == 5 and "may not use" in out.stderr


def test_model_errors_exit_1(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "alice"))
    out = user.run("ask", "fail", "--model", "faults")
    # What the provider said is the server's to log or show (issue 12, item 3); the client
    # only promises the exit code and a message naming the model.
    assert out.returncode == 1 and "the provider of 'faults' failed" in out.stderr


def test_models_in_proxy_and_direct_mode(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "carol", models=["echo"]))
    proxied = json.loads(user.run("models", "--json").stdout)
    assert [m["model_id"] for m in proxied] == ["echo"]
    direct = user.run("--no-proxy", "models", "--json")
    assert "echo" in {m["model_id"] for m in json.loads(direct.stdout)}


def test_direct_mode_uses_llm(user: User) -> None:
    out = user.run("--no-proxy", "ask", "--model", "echo", "straight")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt"] == "straight"


def test_profiles_use_remove_disable(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "a"), "--name", "one")
    user.run("setup-proxy", "configure", issue_url(daemon, "b"), "--name", "two")
    listed = user.run("setup-proxy", "list").stdout
    assert "* two" in listed and "  one" in listed and "chars)" in listed
    assert user.run("setup-proxy", "use", "one").returncode == 0
    status = user.run("setup-proxy", "status")
    assert "profile 'one'" in status.stdout and "reachable" in status.stdout
    assert user.run("setup-proxy", "test", "two").returncode == 0
    assert user.run("setup-proxy", "remove", "two").returncode == 0
    assert not (user.config_dir / "client" / "server-secrets" / "two.key").exists()
    assert user.run("setup-proxy", "disable").returncode == 0
    assert "direct" in user.run("setup-proxy", "status").stdout
    assert user.run("--proxy", "one", "ask", "hi").returncode == 0
    missing = user.run("--proxy", "nope", "ask", "hi")
    assert missing.returncode == 3 and "nope" in missing.stderr


def test_corrupted_config_names_file_and_line_and_is_kept(user: User) -> None:
    path = user.config_dir / "client" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text("version: 1\nprofiles: {corp: [unclosed\n")
    before = path.read_bytes()
    out = user.run("ask", "hi")
    assert out.returncode == 3
    assert str(path) in out.stderr and "line" in out.stderr and "Traceback" not in out.stderr
    assert path.read_bytes() == before


def test_proxy_mode_does_not_import_llm(daemon: RunningDaemon, user: User) -> None:
    user.run("setup-proxy", "configure", issue_url(daemon, "alice"))
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vibectl", "ask", "hi"],
        capture_output=True,
        text=True,
        env=user.env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line}
    top = {name.split(".")[0] for name in imported}
    assert "llm" not in top and "pydantic" not in top and "openai" not in top
    assert "grpc" in top


def test_python_dash_m_vibectl(user: User) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vibectl", "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, **user.env},
        timeout=60,
    )
    assert out.returncode == 0 and "setup-proxy" in out.stdout


# --- the client never weakens its trust (issue 12, item 5) -------------------------------------


def other_pin(pin: str) -> str:
    return ("0" if pin[0] != "0" else "1") + pin[1:]


def legacy_config(user: User, text: str) -> Path:
    """A legacy flat config.yaml, which the next vibectl command migrates."""
    user.config_dir.mkdir(parents=True, exist_ok=True)
    path = user.config_dir / "config.yaml"
    path.write_text(text)
    return path


def trust_system_roots(user: User, tmp_path: Path, pem: bytes) -> None:
    """Make `pem` part of what Python's ssl and gRPC take as the system's trusted roots."""
    roots = tmp_path / "system-roots.pem"
    roots.write_bytes(pem)
    user.env |= {"SSL_CERT_FILE": str(roots), "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(roots)}


def test_a_migrated_pinned_profile_never_falls_back_to_the_system_roots(
    daemon: RunningDaemon, user: User, tmp_path: Path
) -> None:
    # The server holds a certificate the system trusts, but not the CA the profile is
    # pinned to: exactly what an impostor with a public certificate for the host has.
    url = issue_url(daemon, "alice")
    pin = url.rsplit("=", 1)[1]
    legacy_config(user, f"proxy_url: {url.replace(pin, other_pin(pin))}\n")
    trust_system_roots(user, tmp_path, daemon.ca_pem)
    for args in (("ask", "hi"), ("models",), ("setup-proxy", "test"), ("setup-proxy", "status")):
        out = user.run(*args)
        assert out.returncode == 4, (args, out.stdout, out.stderr)
        assert "pin" in out.stderr and "the secret was not sent" in out.stderr, args
        assert "reachable" not in out.stdout and "echo" not in out.stdout, args
    assert not (user.config_dir / "client" / "ca" / "default.pem").exists()


def test_a_migrated_pinned_profile_fetches_its_ca_again_and_checks_the_pin(
    daemon: RunningDaemon, user: User
) -> None:
    url = issue_url(daemon, "alice")
    pin = url.rsplit("=", 1)[1]
    legacy_config(user, f"proxy_url: {url}\n")
    first = user.run("ask", "hi")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["prompt"] == "hi"
    assert "checked it against the pin" in first.stderr
    saved = user.config_dir / "client" / "ca" / "default.pem"
    assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(saved.read_text())).hexdigest() == pin
    again = user.run("ask", "again")
    assert again.returncode == 0 and "fetched" not in again.stderr, again.stderr


def test_a_saved_ca_that_no_longer_matches_the_pin_is_not_trusted(
    daemon: RunningDaemon, user: User, tmp_path: Path
) -> None:
    # The saved CA file is replaced by one that trusts the server, but the pin is not its
    # fingerprint: the file is ignored, the pin decides, and the server fails it.
    url = issue_url(daemon, "alice")
    pin = url.rsplit("=", 1)[1]
    assert user.run("setup-proxy", "configure", url, "--name", "corp").returncode == 0
    config_path = user.config_dir / "client" / "config.yaml"
    config_path.write_text(config_path.read_text().replace(pin, other_pin(pin)))
    out = user.run("ask", "hi")
    assert out.returncode == 4 and "the secret was not sent" in out.stderr, out.stderr
    assert out.stdout == ""


def secret_of(url: str) -> str:
    return url.split("://", 1)[1].split("@", 1)[0]


def test_migration_backup_is_private_and_holds_no_secret(daemon: RunningDaemon, user: User) -> None:
    url = issue_url(daemon, "alice")
    legacy = legacy_config(user, f"# my settings\nmodel: echo\nproxy_url: {url}\ntheme: dark\n")
    legacy.chmod(0o644)
    out = user.run("setup-proxy", "list")
    assert out.returncode == 0, out.stderr
    backup = user.config_dir / "config.yaml.bak"
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    kept = backup.read_text()
    assert secret_of(url) not in kept
    assert "# my settings" in kept and "theme: dark" in kept and "server-secrets" in kept
    assert not legacy.exists()
    assert user.run("ask", "through the migrated profile").returncode == 0


def test_every_hint_to_configure_keeps_the_url_off_the_command_line(
    daemon: RunningDaemon, user: User
) -> None:
    """What vibectl tells a user to run is the form that keeps the secret out of `ps` and
    the shell's history, as the README and vibectl(1) show it."""
    hints = [user.run("setup-proxy", "list").stdout, user.run("setup-proxy", "test").stderr]
    hints.append(user.run("--proxy", "nope", "ask", "hi").stderr)
    url = issue_url(daemon, "alice")
    configured = user.run("setup-proxy", "configure", "-", "--name", "corp", stdin=url)
    assert configured.returncode == 0, configured.stderr
    (user.config_dir / "client" / "server-secrets" / "corp.key").unlink()
    hints.append(user.run("ask", "hi").stderr)
    for hint in hints:
        assert "vibectl setup-proxy configure -" in hint and "configure URL" not in hint, hint
        assert secret_of(url) not in hint


def test_configure_reads_the_url_from_stdin(daemon: RunningDaemon, user: User) -> None:
    url = issue_url(daemon, "alice")
    with subprocess.Popen(
        [str(BIN / "vibectl"), "setup-proxy", "configure", "-", "--name", "corp"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=user.env,
    ) as proc:
        # What `ps` shows while it runs: no secret. Until the child has exec'd, its
        # command line is empty (or the parent's): wait for vibectl's own.
        deadline = time.monotonic() + 30
        argv: list[bytes] = []
        while b"configure" not in argv and time.monotonic() < deadline:
            argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            time.sleep(0.01)
        assert b"configure" in argv and not any(secret_of(url).encode() in a for a in argv)
        stdout, stderr = proc.communicate(f"{url}\n", timeout=120)
    assert proc.returncode == 0, stderr
    assert "profile 'corp' saved and active" in stdout
    assert secret_of(url) not in stdout + stderr
    asked = user.run("ask", "hello")
    assert asked.returncode == 0, asked.stderr
    assert json.loads(asked.stdout)["prompt"] == "hello"


@pytest.mark.parametrize(("stdin", "reason"), [("", "no URL"), ("a\nb\n", "one URL")])
def test_configure_dash_refuses_what_is_not_one_url(user: User, stdin: str, reason: str) -> None:
    out = user.run("setup-proxy", "configure", "-", stdin=stdin)
    assert out.returncode == 2 and reason in out.stderr, out.stderr
    assert not (user.config_dir / "client").exists()


def test_configure_without_a_url_off_a_terminal_is_a_usage_error(user: User) -> None:
    out = user.run("setup-proxy", "configure", stdin="")
    assert out.returncode == 2 and "configure -" in out.stderr, out.stderr


# Runs `vibectl` with the pty as its controlling terminal, as a login shell would.
_ON_A_TERMINAL = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def run_on_a_terminal(user: User, answer: str, *args: str) -> tuple[int, str]:
    """Run vibectl on a new pty, type `answer` when it prompts; its exit code and screen."""
    main, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", _ON_A_TERMINAL, str(BIN / "vibectl"), *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=user.env,
        close_fds=True,
    )
    os.close(terminal)
    screen = b""

    def read_until(done: Callable[[bytes], bool]) -> None:
        nonlocal screen
        deadline = time.monotonic() + 60
        while not done(screen) and time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 4096)
                except OSError:  # EIO: the terminal closed
                    return
                if not chunk:
                    return
                screen += chunk

    try:
        read_until(lambda s: b"(input hidden)" in s)
        os.write(main, answer.encode() + b"\n")
        read_until(lambda s: False)
        return proc.wait(timeout=60), screen.decode(errors="replace")
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args", [(), ("-",)])
def test_configure_on_a_terminal_prompts_without_echo(
    daemon: RunningDaemon, user: User, args: tuple[str, ...]
) -> None:
    url = issue_url(daemon, "alice")
    code, screen = run_on_a_terminal(user, url, "setup-proxy", "configure", *args)
    assert code == 0, screen
    assert "(input hidden)" in screen and "saved and active" in screen
    assert secret_of(url) not in screen
    assert user.run("ask", "hi").returncode == 0
