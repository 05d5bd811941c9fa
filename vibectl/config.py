"""Client configuration: profiles, the active profile, timeouts and per-profile secrets.

Everything lives under the config directory (``$VIBECTL_CONFIG_DIR``, else
``$XDG_CONFIG_HOME/vibectl``, else ``~/.config/vibectl``)::

    client/config.yaml                   settings and profiles, mode 0600, never a secret
    client/server-secrets/<profile>.key  the profile's client secret, mode 0600
    client/ca/<profile>.pem              the CA pinned by the URL's ca-sha256, mode 0644

Directories are 0700 and every file is written atomically (temporary file in the
same directory, fsync, rename). The format of ``client/config.yaml``::

    version: 1
    active_profile: corp          # null: no proxy, vibectl calls models directly
    model: null                   # default model for `vibectl ask`
    profiles:
      corp:
        host: bastion.example.com
        port: 50051
        ca_sha256: "<64 hex digits>"  # the pin from the URL, or null
        ca_file: /home/u/.config/vibectl/client/ca/corp.pem  # null: see below
        insecure: false           # true only for vibectl-server-insecure:// (no TLS)
        timeout_seconds: 60       # deadline of one call
        connect_timeout_seconds: 10
    redaction:
      enabled: true               # false: prompts are sent without replacing secrets
    extra: {}                     # settings carried over from a legacy file, kept verbatim

A profile with a ``ca_sha256`` pin trusts only the certificate with that
fingerprint, found in ``ca_file`` or ``client/ca/<profile>.pem`` or else fetched
again and checked against the pin; never the system's trust store (see
vibectl.adapters.profile_ca). Without a pin, ``ca_file`` null means the system's
trust store.

A legacy flat ``config.yaml`` directly in the config directory (keys such as
``model`` and ``proxy_url``, or the 0.11 ``proxy:`` block) is migrated into this
layout once, and then replaced by ``config.yaml.bak`` (mode 0600, its secrets cut
out) so it is never read again.

Proxy mode must start fast: this module imports only the standard library,
PyYAML and vibectl.proxy_url.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from vibectl import proxy_url
from vibectl.util.files import atomic_write
from vibectl.util.masking import MIN_REDACTED_LENGTH
from vibectl.util.masking import mask as mask  # re-exported: vibectl setup-proxy shows secrets

VERSION = 1
PROFILE_NAME_RULE = (
    "a profile name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
)
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_TOP_KEYS = ("version", "active_profile", "model", "profiles", "redaction", "extra")
_TIMEOUTS = {"timeout_seconds": 60.0, "connect_timeout_seconds": 10.0}
_PROFILE_KEYS = ("host", "port", "ca_sha256", "ca_file", "insecure", *_TIMEOUTS)
_LEGACY_PROFILE_KEYS = ("server_url", "jwt_path", "ca_bundle_path", "timeout_seconds")
_LEGACY_PROXY_KEYS = ("enabled", "active_profile", "profiles", *_LEGACY_PROFILE_KEYS)
_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_HEADER = "# vibectl client settings (see vibectl/config.py). Secrets are in server-secrets/.\n"


class ClientConfigError(Exception):
    """The client configuration cannot be used; the message names the file and what to do."""


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$VIBECTL_CONFIG_DIR, else $XDG_CONFIG_HOME/vibectl, else ~/.config/vibectl."""
    env = os.environ if environ is None else environ
    explicit = env.get("VIBECTL_CONFIG_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CONFIG_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says to ignore a relative path
        return Path(xdg) / "vibectl"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".config" / "vibectl"


def validate_profile_name(name: str) -> str:
    """`name` if it is a valid profile name, else ValueError stating the rule."""
    if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
        raise ValueError(f"invalid profile name {name!r}: {PROFILE_NAME_RULE}")
    return name


@dataclass
class Profile:
    name: str
    host: str
    port: int
    ca_sha256: str | None = None
    ca_file: str | None = None
    insecure: bool = False
    timeout_seconds: float = 60.0
    connect_timeout_seconds: float = 10.0


@dataclass
class ClientConfig:
    path: Path
    active_profile: str | None = None
    profiles: dict[str, Profile] = field(default_factory=dict)
    model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # Secrets in prompts are replaced before they leave (vibectl.redaction) unless false.
    redaction_enabled: bool = True

    def active(self) -> Profile | None:
        """The active proxy profile, or None (direct mode)."""
        return self.profiles.get(self.active_profile) if self.active_profile else None


def _bad(path: Path, key: str, problem: str) -> ClientConfigError:
    return ClientConfigError(f"{path}: {key}: {problem}; correct or remove it in that file")


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise ClientConfigError(f"{path}: not UTF-8 text; fix the file or move it aside") from None
    except OSError as e:
        raise ClientConfigError(f"{path}: cannot read it: {e.strerror}") from None


def _yaml_load(path: Path, text: str) -> Any:
    try:
        return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ClientConfigError(
            f"{path}: {where}not valid YAML ({problem}); fix that line or move the file aside "
            "(it was left unchanged)"
        ) from None


def _mapping(path: Path, raw: Any) -> dict[Any, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ClientConfigError(
            f"{path}: expected a mapping of settings, found a {type(raw).__name__}; "
            "fix the file or move it aside"
        )
    return raw


def _positive(path: Path, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _bad(path, key, f"must be a positive number of seconds, not {value!r}")
    if not math.isfinite(value):
        raise _bad(path, key, "must be a finite number of seconds")
    return float(value)


def _parse_profile(path: Path, name: Any, body: Any) -> Profile:
    key = f"profiles.{name}"
    if not isinstance(name, str) or not _PROFILE_NAME.fullmatch(name):
        raise _bad(path, key, PROFILE_NAME_RULE)
    if not isinstance(body, dict):
        raise _bad(path, key, "must be a mapping of settings")
    for k in body:
        if k not in _PROFILE_KEYS:
            raise _bad(path, f"{key}.{k}", f"unknown setting (known: {', '.join(_PROFILE_KEYS)})")
    host = body.get("host")
    if not isinstance(host, str) or not host.strip():
        raise _bad(path, f"{key}.host", "required: the server's host name or address")
    port = body.get("port", proxy_url.DEFAULT_PORT)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise _bad(path, f"{key}.port", f"must be a port number from 1 to 65535, not {port!r}")
    pin = body.get("ca_sha256")
    if pin is not None:
        pin = pin.lower().replace(":", "") if isinstance(pin, str) else pin
        if not isinstance(pin, str) or not _FINGERPRINT.fullmatch(pin):
            raise _bad(path, f"{key}.ca_sha256", "must be 64 hexadecimal digits or null")
    ca_file = body.get("ca_file")
    if ca_file is not None and (not isinstance(ca_file, str) or not ca_file):
        raise _bad(path, f"{key}.ca_file", "must be the path of a PEM file or null")
    insecure = body.get("insecure", False)
    if not isinstance(insecure, bool):
        raise _bad(path, f"{key}.insecure", "must be true or false")
    call, connect = (_positive(path, f"{key}.{k}", body.get(k, d)) for k, d in _TIMEOUTS.items())
    return Profile(name, host.strip(), port, pin, ca_file, insecure, call, connect)


def _parse_config(path: Path, raw: Any) -> ClientConfig:
    raw = _mapping(path, raw)
    for k in raw:
        if k not in _TOP_KEYS:
            raise _bad(path, str(k), f"unknown setting (known: {', '.join(_TOP_KEYS)})")
    version = raw.get("version", VERSION)
    if isinstance(version, bool) or version != VERSION:
        raise _bad(path, "version", f"this vibectl reads version {VERSION}, not {version!r}")
    profiles_raw = raw.get("profiles") or {}
    if not isinstance(profiles_raw, dict):
        raise _bad(path, "profiles", "must be a mapping from profile name to settings")
    profiles = {str(n): _parse_profile(path, n, body) for n, body in profiles_raw.items()}
    active = raw.get("active_profile")
    if active is not None and (not isinstance(active, str) or active not in profiles):
        known = ", ".join(profiles) or "none"
        raise _bad(path, "active_profile", f"{active!r} is not a configured profile ({known})")
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise _bad(path, "model", "must be a model name or null")
    extra = raw.get("extra") or {}
    if not isinstance(extra, dict):
        raise _bad(path, "extra", "must be a mapping")
    config = ClientConfig(path, active, profiles, model.strip() if model else None, dict(extra))
    config.redaction_enabled = _redaction_enabled(path, raw.get("redaction"))
    return config


def _redaction_enabled(path: Path, raw: Any) -> bool:
    if raw is None:
        return True
    if not isinstance(raw, dict):
        raise _bad(path, "redaction", "must be a mapping (enabled: true or false)")
    for k in raw:
        if k != "enabled":
            raise _bad(path, f"redaction.{k}", "unknown setting (known: enabled)")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _bad(path, "redaction.enabled", "must be true or false")
    return enabled


def _to_raw(config: ClientConfig) -> dict[str, Any]:
    for name, p in config.profiles.items():
        if p.name != name:
            raise ValueError(f"profile {p.name!r} is stored under the name {name!r}")
    return {
        "version": VERSION,
        "active_profile": config.active_profile,
        "model": config.model,
        "profiles": {
            n: {k: getattr(p, k) for k in _PROFILE_KEYS} for n, p in config.profiles.items()
        },
        **({} if config.redaction_enabled else {"redaction": {"enabled": False}}),
        "extra": config.extra,
    }


def _legacy_name(name: Any) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).lstrip("._-")[:64] or "default"


def _legacy_profile(path: Path, key: str, name: str, body: Any) -> tuple[Profile, str | None]:
    """A profile and its secret from a legacy server_url (+ timeout, CA bundle, jwt_path)."""
    url = body.get("server_url")
    if not isinstance(url, str):
        raise _bad(path, key, "must be a vibectl-server:// URL")
    try:
        parsed = proxy_url.parse(url)
    except proxy_url.ProxyURLError as e:
        raise _bad(path, key, str(e)) from None
    bundle = body.get("ca_bundle_path")
    ca_file = str(Path(bundle).expanduser()) if isinstance(bundle, str) and bundle else None
    profile = Profile(name, parsed.host, parsed.port, parsed.ca_sha256, ca_file, parsed.insecure)
    if (timeout := body.get("timeout_seconds")) is not None:
        timeout_key = key.rsplit(".", 1)[0] + ".timeout_seconds"
        profile.timeout_seconds = _positive(path, timeout_key, timeout)
    secret, jwt_path = parsed.secret, body.get("jwt_path")
    if not secret and isinstance(jwt_path, str) and jwt_path:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            secret = Path(jwt_path).expanduser().read_text(encoding="utf-8").strip()
    return profile, secret or None


def _from_legacy(
    path: Path, raw: Any, new_path: Path
) -> tuple[ClientConfig, dict[str, str | None]]:
    """The new config and the secrets to store, from a parsed legacy file."""
    raw = _mapping(path, raw)
    config = ClientConfig(path=new_path)
    config.extra = {str(k): v for k, v in raw.items() if k not in ("model", "proxy_url", "proxy")}
    secrets: dict[str, str | None] = {}

    def add(key: str, name: str, body: Any) -> None:
        config.profiles[name], secrets[name] = _legacy_profile(path, key, name, body)

    model = raw.get("model")
    if model is None and isinstance(raw.get("llm"), dict):
        model = raw["llm"].get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(path, "model", "must be a model name")
    config.model = (model.strip() or None) if model else None
    proxy = raw.get("proxy")
    if proxy is not None:
        if not isinstance(proxy, dict):
            raise _bad(path, "proxy", "must be a mapping")
        named = proxy.get("profiles") or {}
        if not isinstance(named, dict):
            raise _bad(path, "proxy.profiles", "must be a mapping")
        for name, body in named.items():
            if isinstance(body, dict) and body.get("server_url"):
                add(f"proxy.profiles.{name}.server_url", _legacy_name(name), body)
        if proxy.get("server_url") and "default" not in config.profiles:
            add("proxy.server_url", "default", proxy)
        wanted = proxy.get("active_profile")
        if proxy.get("enabled", True) is not False:
            if wanted is not None and _legacy_name(wanted) in config.profiles:
                config.active_profile = _legacy_name(wanted)
            elif "default" in config.profiles:
                config.active_profile = "default"
        rest = {str(k): v for k, v in proxy.items() if k not in _LEGACY_PROXY_KEYS}
        if rest:
            config.extra["proxy"] = rest
    if url := raw.get("proxy_url"):
        add("proxy_url", "default", {"server_url": url})
        config.active_profile = "default"
    return config, secrets


# The backup of a migrated legacy file keeps everything but the secrets. A secret needs no
# second copy to be recoverable: it is in server-secrets/<profile>.key (0600), the one place
# vibectl reads it from. A backup keeping it, even at 0600, would be one more file to leak
# through a dotfile repository, a sync or a support request, long after it stopped being
# read. So it is cut out of every vibectl-server URL in the text (comments included) and
# wherever else it appears; the rest (comments, order, unknown keys) stays as the user wrote it.
_URL_SECRET = re.compile(r"(vibectl-server(?:-insecure)?://)[^@\s/?#'\"]+@")
_SECRET_REMOVED = "SECRET-REMOVED"  # noqa: S105 - a placeholder, not a secret


def _backup_text(text: str, secrets: Mapping[str, str], secrets_dir: Path) -> str:
    """The legacy file's text with every secret replaced by SECRET-REMOVED."""
    masked = _URL_SECRET.sub(rf"\1{_SECRET_REMOVED}@", text)
    for secret in secrets.values():
        for form in (secret, quote(secret, safe="")):
            if len(form) >= MIN_REDACTED_LENGTH:  # a short one could be any word
                masked = masked.replace(form, _SECRET_REMOVED)
    if masked == text:
        return text
    kept = "".join(f"#   {n}: {secrets_dir / f'{n}.key'}\n" for n in sorted(secrets))
    return (
        "# vibectl: the settings below were migrated to client/config.yaml, and each secret\n"
        f"# in them was replaced by {_SECRET_REMOVED}."
        + (f" The secrets are kept (mode 0600) in:\n{kept}" if kept else "\n")
        + masked
    )


def _make_dir(path: Path, *, own: bool) -> None:
    """Create `path` 0700; an existing directory is set to 0700 only if it is ours (`own`)."""
    try:
        try:
            path.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            if not own:
                return
        os.chmod(path, 0o700)
    except OSError as e:
        raise ClientConfigError(f"{path}: cannot create it 0700: {e.strerror}") from None


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` (mode `mode`) so readers see the old or the new file, whole."""
    try:
        atomic_write(path, data, mode)
    except OSError as e:
        raise ClientConfigError(f"{path}: cannot write it: {e.strerror}") from None


class ConfigStore:
    """Reads and writes the client's config directory."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else config_dir()
        self.client_dir = self.directory / "client"
        self.config_path = self.client_dir / "config.yaml"
        self.secrets_dir = self.client_dir / "server-secrets"
        self.ca_dir = self.client_dir / "ca"
        self.legacy_path = self.directory / "config.yaml"
        self.migration_notice: str | None = None

    def load(self) -> ClientConfig:
        """The client config (empty if there is none), migrating a legacy file first if needed."""
        self.migration_notice = None
        text = _read_text(self.config_path)
        if text is None:
            if self.legacy_path.is_file():
                return self._migrate()
            return ClientConfig(path=self.config_path)
        return _parse_config(self.config_path, _yaml_load(self.config_path, text))

    def save(self, config: ClientConfig) -> None:
        raw = _to_raw(config)
        _parse_config(self.config_path, raw)  # never write what load() would refuse
        text = _HEADER + yaml.dump(
            raw, Dumper=_DUMPER, sort_keys=False, default_flow_style=False, allow_unicode=True
        )
        self._prepare(self.client_dir)
        _atomic_write(self.config_path, text.encode("utf-8"), 0o600)

    def secret_path(self, profile: str) -> Path:
        return self.secrets_dir / f"{validate_profile_name(profile)}.key"

    def ca_path(self, profile: str) -> Path:
        return self.ca_dir / f"{validate_profile_name(profile)}.pem"

    def save_secret(self, profile: str, secret: str) -> Path:
        path = self.secret_path(profile)
        value = secret.strip()
        if not value or any(c.isspace() for c in value):
            raise ValueError("a client secret is one non-empty line without spaces")
        self._prepare(self.secrets_dir)
        _atomic_write(path, f"{value}\n".encode(), 0o600)
        return path

    def load_secret(self, profile: str) -> str:
        path = self.secret_path(profile)
        missing = (
            f"no secret stored for profile {profile} ({path}); "
            f"run: vibectl setup-proxy configure - --name {profile} (and paste the URL)"
        )
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                if mode & 0o077:
                    raise ClientConfigError(
                        f"{path}: the secret file can be read by other users "
                        f"({stat.filemode(mode)}); refusing to use it. Run: chmod 600 {path}"
                    )
                value = f.read().decode("utf-8", errors="replace").strip()
        except FileNotFoundError:
            raise ClientConfigError(missing) from None
        except OSError as e:
            raise ClientConfigError(f"{path}: cannot read the secret: {e.strerror}") from None
        if not value:
            raise ClientConfigError(missing)
        return value

    def save_ca(self, profile: str, pem: bytes) -> Path:
        path = self.ca_path(profile)
        if b"-----BEGIN CERTIFICATE-----" not in pem:
            raise ValueError("not a PEM certificate")
        self._prepare(self.ca_dir)
        _atomic_write(path, pem, 0o644)
        return path

    def remove_profile_files(self, profile: str) -> None:
        """Delete the profile's stored secret and pinned CA (a user's --ca-bundle is untouched)."""
        for path in (self.secret_path(profile), self.ca_path(profile)):
            try:
                path.unlink(missing_ok=True)
            except OSError as e:
                raise ClientConfigError(f"{path}: cannot remove it: {e.strerror}") from None

    def _prepare(self, directory: Path) -> None:
        _make_dir(self.directory, own=False)
        _make_dir(self.client_dir, own=True)
        if directory != self.client_dir:
            _make_dir(directory, own=True)

    def _migrate(self) -> ClientConfig:
        legacy = self.legacy_path
        text = _read_text(legacy) or ""
        config, secrets = _from_legacy(legacy, _yaml_load(legacy, text), self.config_path)
        stored = {name: secret for name, secret in secrets.items() if secret}
        for name, secret in stored.items():
            self.save_secret(name, secret)
        self.save(config)
        backup = legacy.with_name(f"{legacy.name}.bak")
        n = 0
        while backup.exists():
            n += 1
            backup = legacy.with_name(f"{legacy.name}.bak.{n}")
        try:
            atomic_write(backup, _backup_text(text, stored, self.secrets_dir).encode(), 0o600)
        except OSError as e:
            raise ClientConfigError(
                f"{legacy}: migrated to {self.config_path}, but could not write the backup "
                f"{backup}: {e.strerror}; delete {legacy} yourself (its secrets are now in "
                f"{self.secrets_dir})"
            ) from None
        try:
            legacy.unlink()
        except OSError as e:
            raise ClientConfigError(
                f"{legacy}: migrated to {self.config_path} and backed up to {backup}, but could "
                f"not remove it: {e.strerror}; delete it yourself, it holds secrets"
            ) from None
        self.migration_notice = (
            f"vibectl: moved the settings in {legacy} to the new layout in {self.config_path} "
            f"(secrets in {self.secrets_dir}); the old file is kept, without secrets, as {backup}"
        )
        return config
