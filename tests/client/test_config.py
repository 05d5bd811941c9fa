"""The client's config directory: resolution, atomic 0600 files, errors, legacy migration."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vibectl.config import (
    ClientConfig,
    ClientConfigError,
    ConfigStore,
    Profile,
    config_dir,
    mask,
)

SECRET = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLXNpZ25hdHVyZQ"
PIN = "ab" * 32
URL = f"vibectl-server://{SECRET}@bastion.example.com:50051?ca-sha256={PIN}"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sample(store: ConfigStore) -> ClientConfig:
    config = ClientConfig(path=store.config_path, model="gpt-4o-mini")
    config.profiles["corp"] = Profile(
        name="corp",
        host="bastion.example.com",
        port=50051,
        ca_sha256=PIN,
        ca_file=str(store.ca_dir / "corp.pem"),
        timeout_seconds=30.5,
    )
    config.profiles["lab"] = Profile(name="lab", host="127.0.0.1", port=5000, insecure=True)
    config.active_profile = "corp"
    config.extra = {"theme": "dark", "nested": {"a": [1, 2]}}
    return config


# --- directory resolution -------------------------------------------------------------------


def test_config_dir_resolution_order(tmp_path: Path) -> None:
    env = {
        "VIBECTL_CONFIG_DIR": str(tmp_path / "explicit"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "HOME": str(tmp_path / "home"),
    }
    assert config_dir(env) == tmp_path / "explicit"
    del env["VIBECTL_CONFIG_DIR"]
    assert config_dir(env) == tmp_path / "xdg" / "vibectl"
    env["XDG_CONFIG_HOME"] = "relative/ignored"
    assert config_dir(env) == tmp_path / "home" / ".config" / "vibectl"
    del env["XDG_CONFIG_HOME"]
    assert config_dir(env) == tmp_path / "home" / ".config" / "vibectl"
    env["VIBECTL_CONFIG_DIR"] = ""
    assert config_dir(env) == tmp_path / "home" / ".config" / "vibectl"


def test_store_layout_defaults_to_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VIBECTL_CONFIG_DIR", str(tmp_path))
    store = ConfigStore()
    assert store.directory == tmp_path
    assert store.config_path == tmp_path / "client" / "config.yaml"
    assert store.secrets_dir == tmp_path / "client" / "server-secrets"
    assert store.ca_dir == tmp_path / "client" / "ca"


# --- save / load ------------------------------------------------------------------------------


def test_missing_config_is_empty_and_nothing_is_written(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path / "cfg")
    config = store.load()
    assert config.profiles == {} and config.active_profile is None and config.active() is None
    assert config.path == store.config_path
    assert not (tmp_path / "cfg").exists()
    assert store.migration_notice is None


def test_save_load_round_trip(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path / "cfg")
    config = sample(store)
    store.save(config)
    loaded = ConfigStore(tmp_path / "cfg").load()
    assert loaded == config
    assert loaded.active() == config.profiles["corp"]
    raw = yaml.safe_load(store.config_path.read_text())
    assert raw["version"] == 1
    assert raw["profiles"]["lab"]["insecure"] is True
    assert raw["profiles"]["corp"]["connect_timeout_seconds"] == 10


def test_modes_of_files_and_directories(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = ConfigStore(tmp_path / "cfg")
        store.save(sample(store))
        secret = store.save_secret("corp", SECRET)
        ca = store.save_ca(
            "corp", b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
        )
    finally:
        os.umask(old)
    assert mode(store.config_path) == 0o600
    assert secret == store.secrets_dir / "corp.key" and mode(secret) == 0o600
    assert ca == store.ca_dir / "corp.pem" and mode(ca) == 0o644
    for d in (store.directory, store.client_dir, store.secrets_dir, store.ca_dir):
        assert mode(d) == 0o700, d


def test_existing_loose_client_dir_is_tightened(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.client_dir.mkdir(mode=0o755)
    os.chmod(store.client_dir, 0o755)  # noqa: S103 - the loose mode under test
    store.save(ClientConfig(path=store.config_path))
    assert mode(store.client_dir) == 0o700


def test_atomic_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    for _ in range(3):
        store.save(sample(store))
        store.save_secret("corp", SECRET)
    assert sorted(p.name for p in store.client_dir.iterdir()) == ["config.yaml", "server-secrets"]
    assert [p.name for p in store.secrets_dir.iterdir()] == ["corp.key"]


def test_secret_is_never_in_config_yaml(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.save(sample(store))
    store.save_secret("corp", SECRET)
    assert SECRET not in store.config_path.read_text()
    assert SECRET[:20] not in store.config_path.read_text()
    assert store.load_secret("corp") == SECRET


def test_load_secret_refuses_a_readable_file(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    path = store.save_secret("corp", SECRET)
    os.chmod(path, 0o644)
    with pytest.raises(ClientConfigError) as info:
        store.load_secret("corp")
    assert str(path) in str(info.value)
    assert f"chmod 600 {path}" in str(info.value)
    assert SECRET not in str(info.value)
    os.chmod(path, 0o600)
    assert store.load_secret("corp") == SECRET


def test_load_secret_missing_says_how_to_configure(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigError, match=r"no secret stored for profile corp") as info:
        ConfigStore(tmp_path).load_secret("corp")
    assert "vibectl setup-proxy configure - --name corp" in str(info.value)


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "../etc", "x" * 65, "a b", "a\n"])
def test_profile_names_are_validated(tmp_path: Path, name: str) -> None:
    store = ConfigStore(tmp_path)
    with pytest.raises(ValueError, match="letters, digits"):
        store.save_secret(name, SECRET)
    assert not store.secrets_dir.exists()


def test_valid_profile_names(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    for name in ("a", "corp-1", "Lab_2.eu", "9" * 64):
        assert store.save_secret(name, SECRET).name == f"{name}.key"


def test_remove_profile_files(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.save_secret("corp", SECRET)
    store.save_ca("corp", b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    store.remove_profile_files("corp")
    store.remove_profile_files("corp")  # idempotent
    assert list(store.secrets_dir.iterdir()) == [] and list(store.ca_dir.iterdir()) == []


# --- errors -------------------------------------------------------------------------------------


def test_corrupted_yaml_names_file_and_line_and_is_not_overwritten(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.client_dir.mkdir(parents=True)
    broken = b"version: 1\nprofiles:\n  corp: {host: x, port: 1\nactive_profile: corp\n"
    store.config_path.write_bytes(broken)
    with pytest.raises(ClientConfigError) as info:
        store.load()
    message = str(info.value)
    assert str(store.config_path) in message
    assert "line 4" in message
    assert "Traceback" not in message
    assert store.config_path.read_bytes() == broken
    assert sorted(p.name for p in store.client_dir.iterdir()) == ["config.yaml"]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("version: 2\n", "version"),
        ("colour: red\n", "colour"),
        ("profiles: [a]\n", "profiles"),
        ("profiles: {corp: {host: x, port: 0}}\n", "profiles.corp.port"),
        ("profiles: {corp: {host: x, port: '50051'}}\n", "profiles.corp.port"),
        ("profiles: {corp: {port: 1}}\n", "profiles.corp.host"),
        ("profiles: {corp: {host: x, insecure: 'no'}}\n", "profiles.corp.insecure"),
        ("profiles: {corp: {host: x, ca_sha256: abc}}\n", "profiles.corp.ca_sha256"),
        ("profiles: {corp: {host: x, timeout_seconds: -1}}\n", "profiles.corp.timeout_seconds"),
        ("profiles: {corp: {host: x, connect_timeout_seconds: true}}\n", "connect_timeout"),
        ("profiles: {corp: {host: x, secret: s}}\n", "profiles.corp.secret"),
        ("profiles: {'bad name': {host: x}}\n", "profiles.bad name"),
        ("active_profile: nope\n", "active_profile"),
        ("model: 3\n", "model"),
        ("extra: [1]\n", "extra"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    store = ConfigStore(tmp_path)
    store.client_dir.mkdir(parents=True)
    store.config_path.write_text(text)
    with pytest.raises(ClientConfigError) as info:
        store.load()
    assert str(store.config_path) in str(info.value)
    assert key in str(info.value)
    assert store.config_path.read_text() == text


def test_not_a_mapping_is_refused(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.client_dir.mkdir(parents=True)
    store.config_path.write_text("- a\n- b\n")
    with pytest.raises(ClientConfigError, match="expected a mapping"):
        store.load()


def test_save_refuses_an_invalid_config(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    config = ClientConfig(path=store.config_path, active_profile="missing")
    with pytest.raises(ClientConfigError, match="active_profile"):
        store.save(config)
    assert not store.config_path.exists()


# --- legacy migration -------------------------------------------------------------------------


def migrate(tmp_path: Path, legacy: str) -> tuple[ConfigStore, ClientConfig]:
    (tmp_path / "config.yaml").write_text(legacy)
    store = ConfigStore(tmp_path)
    config = store.load()
    assert store.migration_notice is not None
    assert str(tmp_path / "config.yaml") in store.migration_notice
    assert str(tmp_path / "config.yaml.bak") in store.migration_notice
    assert "\n" not in store.migration_notice
    assert not (tmp_path / "config.yaml").exists()
    backup = tmp_path / "config.yaml.bak"
    assert mode(backup) == 0o600
    assert SECRET not in backup.read_text()
    assert backup.read_text().endswith(legacy.replace(SECRET, "SECRET-REMOVED"))
    assert mode(store.config_path) == 0o600
    assert SECRET not in store.config_path.read_text()
    again = ConfigStore(tmp_path)
    assert again.load() == config
    assert again.migration_notice is None
    return store, config


def test_migrates_flat_model_and_proxy_url(tmp_path: Path) -> None:
    store, config = migrate(
        tmp_path, f"model: claude-3-haiku\nproxy_url: {URL}\ntheme: dark\nshow_raw_output: true\n"
    )
    assert config.model == "claude-3-haiku"
    assert config.active_profile == "default"
    profile = config.profiles["default"]
    assert (profile.host, profile.port, profile.ca_sha256) == ("bastion.example.com", 50051, PIN)
    assert profile.insecure is False and profile.ca_file is None
    assert config.extra == {"theme": "dark", "show_raw_output": True}
    assert store.load_secret("default") == SECRET
    assert mode(store.secrets_dir / "default.key") == 0o600


def test_migrates_nested_proxy_block(tmp_path: Path) -> None:
    legacy = f"""
proxy:
  enabled: true
  server_url: "vibectl-server-insecure://{SECRET}@localhost:5555"
  timeout_seconds: 45
  retry_attempts: 3
llm:
  model: gpt-4o
"""
    store, config = migrate(tmp_path, legacy)
    assert config.model == "gpt-4o"
    assert config.active_profile == "default"
    profile = config.profiles["default"]
    assert (profile.host, profile.port, profile.insecure) == ("localhost", 5555, True)
    assert profile.timeout_seconds == 45
    assert config.extra == {"proxy": {"retry_attempts": 3}, "llm": {"model": "gpt-4o"}}
    assert store.load_secret("default") == SECRET


def test_migrates_disabled_proxy_with_named_profiles(tmp_path: Path) -> None:
    jwt = tmp_path / "dev.jwt"
    jwt.write_text(SECRET + "\n")
    legacy = f"""
proxy:
  enabled: false
  active_profile: corp prod
  profiles:
    corp prod:
      server_url: vibectl-server://bastion.example.com:443
      jwt_path: {jwt}
      ca_bundle_path: /etc/ssl/corp-ca.pem
      timeout_seconds: 20
"""
    store, config = migrate(tmp_path, legacy)
    assert config.active_profile is None
    profile = config.profiles["corp-prod"]
    assert (profile.host, profile.port, profile.ca_file) == (
        "bastion.example.com",
        443,
        "/etc/ssl/corp-ca.pem",
    )
    assert profile.timeout_seconds == 20
    assert store.load_secret("corp-prod") == SECRET


def test_the_backup_keeps_everything_but_the_secrets(tmp_path: Path) -> None:
    # A world-readable legacy file, a secret percent-encoded in a URL, an old URL in a comment.
    encoded = "tok%2Ben%2Fslash" + SECRET
    secret = "tok+en/slash" + SECRET
    legacy = f"""# my old settings
# proxy_url: vibectl-server://{SECRET}X@old.example.com:50051
proxy:
  profiles:
    corp:
      server_url: "vibectl-server://{encoded}@bastion.example.com:50051?ca-sha256={PIN}"
theme: dark
"""
    path = tmp_path / "config.yaml"
    path.write_text(legacy)
    path.chmod(0o644)
    store = ConfigStore(tmp_path)
    store.load()
    assert store.load_secret("corp") == secret
    backup = tmp_path / "config.yaml.bak"
    assert mode(backup) == 0o600
    text = backup.read_text()
    assert SECRET not in text and "tok" not in text
    assert str(store.secrets_dir / "corp.key") in text and "SECRET-REMOVED" in text
    assert "# my old settings" in text and "old.example.com" in text
    kept = yaml.safe_load(text)
    assert kept["theme"] == "dark"
    assert kept["proxy"]["profiles"]["corp"]["server_url"] == (
        f"vibectl-server://SECRET-REMOVED@bastion.example.com:50051?ca-sha256={PIN}"
    )
    assert "without secrets" in (store.migration_notice or "")


def test_migrates_model_only(tmp_path: Path) -> None:
    store, config = migrate(tmp_path, "model: gpt-4o-mini\n")
    assert config.model == "gpt-4o-mini"
    assert config.profiles == {} and config.active_profile is None and config.extra == {}
    assert not store.secrets_dir.exists()


def test_existing_backup_is_not_overwritten(tmp_path: Path) -> None:
    (tmp_path / "config.yaml.bak").write_text("older backup\n")
    (tmp_path / "config.yaml").write_text("model: m\n")
    store = ConfigStore(tmp_path)
    assert store.load().model == "m"
    assert (tmp_path / "config.yaml.bak").read_text() == "older backup\n"
    assert (tmp_path / "config.yaml.bak.1").read_text() == "model: m\n"
    assert store.migration_notice is not None and "config.yaml.bak.1" in store.migration_notice


@pytest.mark.parametrize(
    ("legacy", "needle"),
    [
        ("model: [unclosed\nproxy_url: x\n", "line 2"),
        ("proxy_url: https://example.com\n", "proxy_url"),
        ("proxy: {server_url: 'vibectl-server://s@h:99999'}\n", "proxy.server_url"),
        ("- just\n- a list\n", "expected a mapping"),
    ],
)
def test_corrupted_legacy_changes_nothing(tmp_path: Path, legacy: str, needle: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(legacy)
    store = ConfigStore(tmp_path)
    with pytest.raises(ClientConfigError) as info:
        store.load()
    assert str(path) in str(info.value) and needle in str(info.value)
    assert path.read_text() == legacy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
    assert store.migration_notice is None


def test_new_layout_wins_over_a_legacy_file(tmp_path: Path) -> None:
    store = ConfigStore(tmp_path)
    store.save(sample(store))
    (tmp_path / "config.yaml").write_text("model: legacy\n")
    assert store.load().model == "gpt-4o-mini"
    assert store.migration_notice is None
    assert (tmp_path / "config.yaml").exists()


# --- mask and imports ---------------------------------------------------------------------------


def test_mask() -> None:
    secret = "eyJh" + "x" * 504 + "0Dg4"
    assert mask(secret) == "eyJh…0Dg4 (512 chars)"
    assert mask("abcdefghij") == "ab…ij (10 chars)"
    assert mask("abcd") == "… (4 chars)"
    assert mask("") == "… (0 chars)"
    for s in (SECRET, "abcdefghijklmnopqrstuvwxyz"):
        shown = mask(s).split(" ")[0].replace("…", "")
        assert len(shown) <= 8 and s not in mask(s)


def test_import_is_light() -> None:
    code = (
        "import sys, vibectl.config; "
        "print(','.join(m for m in ('llm', 'grpc', 'pydantic') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""
