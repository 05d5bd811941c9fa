"""Provider API keys: found in systemd credentials, a keys/ directory, or the environment.

Keys never live in the YAML file. Lookup order for a key named ``openai``:
``$CREDENTIALS_DIRECTORY/openai`` (systemd ``LoadCredential=``), then
``<config dir>/keys/openai``, then ``<state dir>/keys/openai``, then the
model's usual environment variable (e.g. ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from vibectl.util.masking import redact

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ProviderKeys:
    """Reads provider keys once per (re)load; values stay in memory only."""

    def __init__(
        self,
        directories: Iterable[Path | tuple[Path, str]],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        # Each source is a directory and a file-name prefix ("" for most).
        self._sources = [d if isinstance(d, tuple) else (d, "") for d in directories]
        self._environ = os.environ if environ is None else environ
        self._cache: dict[tuple[str, str | None], str | None] = {}
        # systemd copies credentials in when the service starts; a reload cannot fix them.
        self.credentials_dir: Path | None = None
        # Under systemd, keys are meant to arrive through LoadCredential= (read as root, at
        # start), so an unreadable key file is fixed by a restart, not by a reload.
        self.under_systemd = False
        self.kind = "provider key"  # what a message calls the files read

    @classmethod
    def for_daemon(
        cls, config_dir: Path | None, state_dir: Path, environ: Mapping[str, str] | None = None
    ) -> ProviderKeys:
        return cls._credentials_then(config_dir, [state_dir / "keys"], environ)

    @classmethod
    def for_credentials(
        cls, config_dir: Path | None, environ: Mapping[str, str] | None = None
    ) -> ProviderKeys:
        """The daemon's own credentials (e.g. `postgresql-dsn`): systemd's credentials,
        then keys/ beside the config file; never the state directory or the environment
        (`get` without an env_var)."""
        keys = cls._credentials_then(config_dir, [], environ)
        keys.kind = "credential"
        return keys

    @classmethod
    def _credentials_then(
        cls, config_dir: Path | None, more: list[Path], environ: Mapping[str, str] | None
    ) -> ProviderKeys:
        env = os.environ if environ is None else environ
        dirs: list[Path | tuple[Path, str]] = []
        if env.get("CREDENTIALS_DIRECTORY"):
            credentials = Path(env["CREDENTIALS_DIRECTORY"])
            # LoadCredential=openai:FILE gives "openai"; the unit's
            # LoadCredential=keys:/etc/vibectld/keys gives "keys_openai".
            dirs += [credentials, (credentials, "keys_")]
        if config_dir is not None:
            dirs.append(config_dir / "keys")
        dirs += more
        keys = cls(dirs, env)
        if env.get("CREDENTIALS_DIRECTORY"):
            keys.credentials_dir = Path(env["CREDENTIALS_DIRECTORY"])
        # systemd sets INVOCATION_ID for every service it runs.
        keys.under_systemd = bool(env.get("INVOCATION_ID") or env.get("CREDENTIALS_DIRECTORY"))
        return keys

    def places(self, name: str) -> list[Path]:
        """Every file `get(name)` reads, in order: for a message about a missing key."""
        return [directory / f"{prefix}{name}" for directory, prefix in self._sources]

    def get(self, name: str, env_var: str | None = None) -> str | None:
        """The key called `name`, or None when no source has it."""
        cache_key = (name, env_var)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._find(name, env_var)
        return self._cache[cache_key]

    def _find(self, name: str, env_var: str | None) -> str | None:
        if _KEY_NAME.fullmatch(name):
            for directory, prefix in self._sources:
                path = directory / f"{prefix}{name}"
                try:
                    value = path.read_text(encoding="utf-8").strip()
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as e:
                    # An unreadable key file is an operator mistake worth failing loudly on.
                    raise ProviderKeyError(
                        f"cannot read {self.kind} file {path}: {e.strerror}; {self._fix(directory)}"
                    ) from None
                if value:
                    return value
        if env_var and self._environ.get(env_var):
            return self._environ[env_var]
        return None

    def _fix(self, directory: Path) -> str:
        """What the operator should do about an unreadable key file in `directory`."""
        readable = "make it readable by the vibectld user (mode 0600, owned by it)"
        if directory == self.credentials_dir:
            return (
                "fix the file LoadCredential= names, then "
                "`systemctl restart vibectld` (credentials are copied at start)"
            )
        if self.under_systemd:
            # Most likely a root-only file added after the start: LoadCredential= would
            # have read it as root, but only a start runs LoadCredential=.
            return (
                "under systemd, keys arrive through LoadCredential= (the unit loads "
                "/etc/vibectld/keys), read as root when the service starts: run "
                "`systemctl restart vibectld` (a reload does not load credentials), "
                f"or {readable}"
            )
        return readable

    def redact(self, text: str) -> str:
        """Remove every key value this process has read from `text`."""
        return redact(text, (value for value in self._cache.values() if value))


class ProviderKeyError(Exception):
    """A provider key file exists but cannot be used."""
