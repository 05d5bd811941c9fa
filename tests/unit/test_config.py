"""The config loader: defaults, every error naming its key, and nothing bound or built."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from vibectld.config import ConfigError
from vibectld.config_file import load_config, parse_config


def test_defaults_match_the_documented_minimal_config() -> None:
    config = parse_config(None)
    assert config.server.listen == "0.0.0.0:50051"
    assert config.admin.socket == Path("/run/vibectld/admin.sock")
    assert config.admin.group == "vibectld-admin"
    assert config.state_dir == Path("/var/lib/vibectld")
    assert config.limits.requests_per_minute == 60
    assert config.limits.max_input_chars == 200_000
    assert config.clients.default_expiry_seconds == 90 * 86400
    assert config.clients.max_expiry_seconds == 2 * 365 * 86400
    assert config.server.max_request_bytes == 1024 * 1024


def test_the_design_documents_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        """
server:
  listen: "0.0.0.0:50051"
  public_url: "vibectl-server://bastion.example.com:50051"
  tls: {cert_file: null, key_file: null, client_ca_file: null}
admin:
  socket: /run/vibectld/admin.sock
  group: vibectld-admin
state_dir: /var/lib/vibectld
models:
  default: gpt-4o-mini
  allowed: []
  aliases: {}
  openai_compatible:
    - model_id: local-qwen
      model_name: qwen2.5-32b
      api_base: "http://gpu-box:8000/v1"
      api_key_name: gpu-box
limits:
  requests_per_minute: 60
  concurrent_requests: 4
  tokens_per_day: null
  max_input_chars: 200000
  request_timeout_seconds: 120
clients:
  default_expiry: 90d
  max_expiry: 2y
logging: {level: info, format: auto}
"""
    )
    config = load_config(path)
    assert config.server.public_host == "bastion.example.com"
    assert config.models.openai_compatible[0].api_key_name == "gpu-box"
    assert config.config_dir == tmp_path.resolve()


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ({"servr": {}}, "servr"),
        ({"server": {"lisen": "x"}}, "server.lisen"),
        ({"server": {"listen": "nope"}}, "server.listen"),
        ({"server": {"listen": "1.2.3.4:99999"}}, "server.listen"),
        ({"server": {"public_url": "https://x"}}, "server.public_url"),
        ({"server": {"tls": {"cert_file": "/a.pem"}}}, "server.tls"),
        ({"server": {"tls": {"cert_file": "rel.pem", "key_file": "/k"}}}, "server.tls.cert_file"),
        ({"limits": {"requests_per_minute": -1}}, "limits.requests_per_minute"),
        ({"limits": {"concurrent_requests": "four"}}, "limits.concurrent_requests"),
        ({"limits": {"request_timeout_seconds": True}}, "limits.request_timeout_seconds"),
        ({"clients": {"max_expiry": "forever"}}, "clients.max_expiry"),
        ({"clients": {"default_expiry": "3y", "max_expiry": "1y"}}, "clients.default_expiry"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"models": {"allowed": "echo"}}, "models.allowed"),
        ({"models": {"openai_compatible": [{"model_id": "x"}]}}, "models.openai_compatible[0]"),
        ({"state_dir": "relative/dir"}, "state_dir"),
        ({"storage": {"backend": "mysql"}}, "storage.backend"),
        ({"storage": {"dsn": "host=db"}}, "storage.dsn"),  # never in the file
        ({"storage": {"max_staleness": 5}}, "storage.max_staleness"),  # no unit
        ({"storage": {"max_staleness": "5 seconds"}}, "storage.max_staleness"),
        ({"storage": {"max_staleness": "0s"}}, "storage.max_staleness"),
        ({"storage": {"max_staleness": "500ms"}}, "storage.max_staleness"),  # under 1 s
        ({"storage": {"max_staleness": "9" * 400 + "s"}}, "storage.max_staleness"),
        ({"storage": {"on_stale": "strict"}}, "storage.on_stale"),
        (["a", "list"], "the file"),
    ],
)
def test_bad_values_name_the_key(raw: Any, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    assert str(err.value).startswith(key)


def test_invalid_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "line" in str(err.value)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.yaml")


def test_the_storage_backend_is_read_and_needs_a_restart() -> None:
    from vibectld.config import RESTART_ONLY

    assert parse_config(None).storage.backend == "sqlite"
    assert parse_config({"storage": {"backend": "postgresql"}}).storage.backend == "postgresql"
    assert "storage.backend" in RESTART_ONLY


def test_staleness_keys_are_read_and_a_reload_applies_them() -> None:
    from vibectld.config import RESTART_ONLY, keep_restart_only

    default = parse_config(None).storage
    assert (default.max_staleness_seconds, default.on_stale) == (5.0, "serve")
    raw = {"storage": {"max_staleness": "1500ms", "on_stale": "refuse"}}
    read = parse_config(raw).storage
    assert (read.max_staleness_seconds, read.on_stale) == (1.5, "refuse")
    assert parse_config({"storage": {"max_staleness": "2m"}}).storage.max_staleness_seconds == 120
    assert not {"storage.max_staleness", "storage.on_stale"} & set(RESTART_ONLY)
    # A reload keeps only restart-only keys: the new values are the ones in force.
    kept = keep_restart_only(parse_config(None), parse_config(raw))
    assert kept.storage == read
