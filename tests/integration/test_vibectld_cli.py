"""The `vibectld` command as an operator runs it: a real process, real signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmpdir

BIN = Path(sys.executable).parent


def write_config(path: Path, sock_dir: Path, state: Path, listen: str, **extra: object) -> Path:
    raw: dict[str, object] = {
        "server": {"listen": listen},
        "admin": {"socket": str(sock_dir / "admin.sock")},
        "state_dir": str(state),
        "models": {"default": "echo"},
        "logging": {"format": "json"},
        **extra,
    }
    path.write_text(json.dumps(raw))
    return path


def vibectld(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "vibectld"), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def sockets() -> Iterator[Path]:
    path = short_tmpdir()
    yield path
    for p in path.iterdir():
        p.unlink()
    path.rmdir()


def test_version() -> None:
    out = vibectld("--version")
    assert out.returncode == 0 and out.stdout.startswith("vibectld ")


def test_check_config_accepts_a_valid_file(tmp_path: Path, sockets: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", sockets, tmp_path / "s", "127.0.0.1:0")
    out = vibectld("--config", str(cfg), "--check-config")
    assert out.returncode == 0, out.stderr
    assert "valid" in out.stdout


def test_check_config_names_the_bad_key_and_the_daemon_refuses_it(
    tmp_path: Path, sockets: Path
) -> None:
    cfg = write_config(
        tmp_path / "c.yaml", sockets, tmp_path / "s", "127.0.0.1:0", limits={"rpm": 5}
    )
    out = vibectld("--config", str(cfg), "--check-config")
    assert out.returncode == 1
    assert "limits.rpm" in out.stderr and "unknown key" in out.stderr
    started = vibectld("--config", str(cfg))
    assert started.returncode == 1 and "limits.rpm" in started.stderr
    assert not (tmp_path / "s").exists()


def test_env_var_names_the_config(tmp_path: Path) -> None:
    env_cfg = tmp_path / "from-env.yaml"
    env_cfg.write_text("bogus: 1\n")
    out = subprocess.run(
        [str(BIN / "vibectld"), "--check-config"],
        capture_output=True,
        text=True,
        env={"VIBECTLD_CONFIG": str(env_cfg), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert out.returncode == 1 and "bogus" in out.stderr


def test_port_in_use_fails_the_start_with_one_clear_line(tmp_path: Path, sockets: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "c.yaml", sockets, tmp_path / "s", f"127.0.0.1:{port}")
        out = vibectld("--config", str(cfg))
    assert out.returncode == 1
    errors = [json.loads(line) for line in out.stderr.splitlines() if '"error"' in line]
    assert errors and f"127.0.0.1:{port}" in errors[-1]["error"]
    assert "Traceback" not in out.stderr


def test_sigterm_stops_the_daemon_cleanly(tmp_path: Path, sockets: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", sockets, tmp_path / "s", "127.0.0.1:0")
    proc = subprocess.Popen(
        [str(BIN / "vibectld"), "--config", str(cfg)],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sock = sockets / "admin.sock"
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), "the admin socket never appeared"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    events = [json.loads(line)["event"] for line in err.splitlines() if line.startswith("{")]
    assert events[-2:] == ["stopping", "stopped"]
    assert not sock.exists()
