"""ProviderKeys: where provider keys come from, in which order, and how they are redacted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vibectld.providers.keys import ProviderKeyError, ProviderKeys

ENV_VAR = "GPU_BOX_API_KEY"


def write_key(directory: Path, name: str, value: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(value, encoding="utf-8")
    path.chmod(0o600)
    return path


class Layout:
    """A credentials dir, a config dir and a state dir, each with a keys/ source."""

    def __init__(self, root: Path) -> None:
        self.credentials = root / "credentials"
        self.config_dir = root / "etc"
        self.state_dir = root / "state"
        for directory in (self.credentials, self.config_dir / "keys", self.state_dir / "keys"):
            directory.mkdir(parents=True)

    def keys(self, **environ: str) -> ProviderKeys:
        env = {"CREDENTIALS_DIRECTORY": str(self.credentials), **environ}
        return ProviderKeys.for_daemon(self.config_dir, self.state_dir, env)


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(tmp_path)


def test_lookup_order_credentials_then_config_dir_then_state_dir_then_env(
    layout: Layout,
) -> None:
    env = {ENV_VAR: "from-the-environment"}
    assert layout.keys(**env).get("gpu", ENV_VAR) == "from-the-environment"
    write_key(layout.state_dir / "keys", "gpu", "from-the-state-dir")
    assert layout.keys(**env).get("gpu", ENV_VAR) == "from-the-state-dir"
    write_key(layout.config_dir / "keys", "gpu", "from-the-config-dir")
    assert layout.keys(**env).get("gpu", ENV_VAR) == "from-the-config-dir"
    write_key(layout.credentials, "gpu", "from-systemd-credentials")
    assert layout.keys(**env).get("gpu", ENV_VAR) == "from-systemd-credentials"


def test_credentials_loaded_from_the_units_keys_directory(layout: Layout) -> None:
    """LoadCredential=keys:/etc/vibectld/keys names each file's credential keys_<file>."""
    write_key(layout.credentials, "keys_openai", "from-the-keys-directory-credential")
    write_key(layout.state_dir / "keys", "openai", "from-the-state-dir")
    assert layout.keys().get("openai") == "from-the-keys-directory-credential"
    write_key(layout.credentials, "openai", "from-a-per-key-credential")
    assert layout.keys().get("openai") == "from-a-per-key-credential"


def test_without_credentials_directory_or_config_dir(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    write_key(state_dir / "keys", "gpu", "from-the-state-dir")
    keys = ProviderKeys.for_daemon(None, state_dir, {})
    assert keys.get("gpu") == "from-the-state-dir"
    assert keys.get("other") is None


def test_an_absent_key_is_none_and_an_unset_env_var_is_not_consulted(layout: Layout) -> None:
    keys = layout.keys()
    assert keys.get("gpu") is None
    assert keys.get("gpu", ENV_VAR) is None
    assert layout.keys(**{ENV_VAR: ""}).get("gpu", ENV_VAR) is None


def test_whitespace_around_a_key_is_stripped(layout: Layout) -> None:
    write_key(layout.state_dir / "keys", "gpu", "  sk-with-newline-12345\n\n")
    assert layout.keys().get("gpu") == "sk-with-newline-12345"


def test_a_blank_key_file_falls_through_to_the_next_source(layout: Layout) -> None:
    write_key(layout.credentials, "gpu", " \n")
    write_key(layout.state_dir / "keys", "gpu", "the-real-key-123")
    assert layout.keys().get("gpu") == "the-real-key-123"


def test_a_key_file_that_cannot_be_read_is_an_error_naming_it(layout: Layout) -> None:
    # A directory where the key file should be: unreadable as a file, even for root.
    (layout.config_dir / "keys" / "gpu").mkdir()
    write_key(layout.state_dir / "keys", "gpu", "never-reached-1234")
    with pytest.raises(ProviderKeyError) as err:
        layout.keys().get("gpu")
    message = str(err.value)
    assert str(layout.config_dir / "keys" / "gpu") in message
    assert "0600" in message


def test_an_unreadable_systemd_credential_says_to_restart(layout: Layout) -> None:
    # systemd copies credentials in at start, so a reload cannot pick up a fixed file.
    (layout.credentials / "gpu").mkdir()
    with pytest.raises(ProviderKeyError) as err:
        layout.keys().get("gpu")
    message = str(err.value)
    assert str(layout.credentials / "gpu") in message
    assert "systemctl restart vibectld" in message


def test_under_systemd_an_unreadable_key_file_says_to_restart(layout: Layout) -> None:
    """A root-only key added to /etc/vibectld/keys after the start: LoadCredential= reads
    it as root, but only when the service starts, so the fix is a restart, not chmod."""
    (layout.config_dir / "keys" / "gpu").mkdir()
    for env in ({"INVOCATION_ID": "0123456789abcdef"}, {}):
        with pytest.raises(ProviderKeyError) as err:
            layout.keys(**env).get("gpu")
        message = str(err.value)
        assert str(layout.config_dir / "keys" / "gpu") in message
        assert "systemctl restart vibectld" in message and "LoadCredential=" in message
        assert "a reload does not" in message


def test_without_systemd_an_unreadable_key_file_says_to_fix_its_mode(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    (state_dir / "keys" / "gpu").mkdir(parents=True)
    # A terminal or a container, with or without a config dir: nothing to restart.
    for config_dir in (None, tmp_path / "etc"):
        with pytest.raises(ProviderKeyError) as err:
            ProviderKeys.for_daemon(config_dir, state_dir, {}).get("gpu")
        message = str(err.value)
        assert str(state_dir / "keys" / "gpu") in message
        assert "mode 0600" in message and "restart" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_a_key_file_without_read_permission_is_an_error_naming_it(layout: Layout) -> None:
    path = write_key(layout.credentials, "gpu", "secret-value-1234")
    path.chmod(0)
    with pytest.raises(ProviderKeyError, match=str(path)):
        layout.keys().get("gpu")


@pytest.mark.parametrize(
    "name",
    ["../x", "..", "../state/keys/x", "/etc/x", "a/b", ".hidden", "", "-rf"],
)
def test_a_bad_key_name_is_never_used_as_a_path(layout: Layout, name: str) -> None:
    # Files the traversal would reach, if the name were joined onto a keys/ dir.
    write_key(layout.state_dir, "x", "outside-keys-dir-1")
    write_key(layout.state_dir / "keys" / "a", "b", "nested-key-file-1")
    write_key(layout.state_dir / "keys", ".hidden", "hidden-key-file-1")
    write_key(layout.state_dir / "keys", "-rf", "dash-key-file-123")
    keys = layout.keys()
    assert keys.get(name) is None
    # The environment variable still applies: only the file lookup is skipped.
    assert layout.keys(**{ENV_VAR: "env-value"}).get(name, ENV_VAR) == "env-value"


def test_a_key_name_with_a_trailing_newline_is_refused(layout: Layout) -> None:
    write_key(layout.state_dir / "keys", "gpu\n", "newline-named-key-1")
    assert layout.keys().get("gpu\n") is None


def test_good_key_names_with_dots_dashes_and_underscores(layout: Layout) -> None:
    for name in ("openai", "gpu-box", "gpu_box.2", "A1"):
        write_key(layout.state_dir / "keys", name, f"value-of-{name}")
    keys = layout.keys()
    for name in ("openai", "gpu-box", "gpu_box.2", "A1"):
        assert keys.get(name) == f"value-of-{name}"


def test_keys_are_read_once_per_instance(layout: Layout) -> None:
    path = write_key(layout.state_dir / "keys", "gpu", "first-value-1234")
    keys = layout.keys()
    assert keys.get("gpu") == "first-value-1234"
    path.write_text("second-value-1234", encoding="utf-8")
    assert keys.get("gpu") == "first-value-1234"
    # A reload builds a new instance, which sees the new value.
    assert layout.keys().get("gpu") == "second-value-1234"


def test_redact_removes_every_key_value_read(layout: Layout) -> None:
    write_key(layout.credentials, "openai", "sk-openai-abcdef123456")
    write_key(layout.state_dir / "keys", "gpu", "sk-gpu-0987654321")
    keys = layout.keys(**{ENV_VAR: "env-secret-value-42"})
    text = "openai said sk-openai-abcdef123456, gpu said sk-gpu-0987654321 twice: sk-gpu-0987654321"
    # Nothing read yet, nothing to redact.
    assert keys.redact(text) == text
    keys.get("openai")
    keys.get("gpu")
    keys.get("missing", ENV_VAR)
    assert keys.redact(text) == "openai said ***, gpu said *** twice: ***"
    assert keys.redact("env: env-secret-value-42.") == "env: ***."
    assert keys.redact("nothing secret here") == "nothing secret here"


def test_redact_leaves_very_short_values_alone(layout: Layout) -> None:
    """Values under 8 characters would mangle ordinary text; they are not real API keys."""
    write_key(layout.state_dir / "keys", "tiny", "abc")
    keys = layout.keys()
    assert keys.get("tiny") == "abc"
    assert keys.redact("abc abcdef") == "abc abcdef"


def test_the_daemons_own_credentials_come_from_systemd_or_beside_the_config(
    layout: Layout,
) -> None:
    """postgresql-dsn is read like a provider key, but never from the state dir or the
    environment, and a message calls its file a credential."""
    env = {"CREDENTIALS_DIRECTORY": str(layout.credentials), "POSTGRESQL_DSN": "env"}
    credentials = ProviderKeys.for_credentials(layout.config_dir, env)
    assert credentials.places("postgresql-dsn") == [
        layout.credentials / "postgresql-dsn",
        layout.credentials / "keys_postgresql-dsn",
        layout.config_dir / "keys" / "postgresql-dsn",
    ]
    write_key(layout.state_dir / "keys", "postgresql-dsn", "host=state")
    assert credentials.get("postgresql-dsn") is None
    write_key(layout.config_dir / "keys", "postgresql-dsn", "host=beside-the-config\n")
    assert ProviderKeys.for_credentials(layout.config_dir, env).get("postgresql-dsn") == (
        "host=beside-the-config"
    )
    write_key(layout.credentials, "keys_postgresql-dsn", "host=credential")
    assert ProviderKeys.for_credentials(layout.config_dir, env).get("postgresql-dsn") == (
        "host=credential"
    )
    (layout.credentials / "postgresql-dsn").mkdir()  # unreadable as a file
    with pytest.raises(ProviderKeyError, match=r"cannot read credential file .*postgresql-dsn"):
        ProviderKeys.for_credentials(layout.config_dir, env).get("postgresql-dsn")
