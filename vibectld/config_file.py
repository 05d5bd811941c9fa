"""Reading the YAML file into a DaemonConfig: load_config() is the only reader of the file
and the environment.

Loading is pure: it validates and normalises, but binds nothing and builds no TLS
context. Every error names the dotted key and what is wrong with it. The shape it fills
in (the frozen dataclasses) is config.py's; how each kind of value is read is
config_values.py's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from vibectld.config import (
    AdminConfig,
    ClientsConfig,
    DaemonConfig,
    LimitsConfig,
    LoggingConfig,
    MetricsConfig,
    ModelPrice,
    ModelsConfig,
    OpenAICompatibleModel,
    RedactionConfig,
    ServerConfig,
    StorageConfig,
    TLSConfig,
)
from vibectld.config_values import (
    ConfigError,
    _choice,
    _custom_rules,
    _detectors,
    _duration,
    _int,
    _interval,
    _limit,
    _listen,
    _opt_int,
    _opt_listen,
    _opt_path,
    _opt_str,
    _path,
    _price,
    _public_url,
    _seconds,
    _str,
    _str_list,
    _str_map,
    _usd,
    _workers,
)

DEFAULT_CONFIG_PATH = Path("/etc/vibectld/config.yaml")
CONFIG_ENV = "VIBECTLD_CONFIG"

# The least storage.max_staleness may be: a node's view is brought up to date every 0.5 s
# (the change feed's catch-up read), so anything shorter would call a healthy node stale.
MIN_STALENESS_SECONDS = 1.0


T = TypeVar("T")


class _Section:
    """Reads one mapping of the YAML file, tracking which keys were consumed."""

    def __init__(self, raw: Any, prefix: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{prefix or 'the file'}: must be a mapping of keys to values")
        self.raw: dict[str, Any] = raw
        self.prefix = prefix
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, conv: Callable[[str, Any], T], default: T) -> T:
        self.used.add(name)
        if name not in self.raw:
            return default
        return conv(self.key(name), self.raw[name])

    def section(self, name: str) -> _Section:
        self.used.add(name)
        return _Section(self.raw.get(name), self.key(name))

    def finish(self) -> None:
        unknown = sorted(set(map(str, self.raw)) - self.used)
        if unknown:
            where = f"in '{self.prefix}'" if self.prefix else "at the top level"
            raise ConfigError(
                f"{self.key(unknown[0])}: unknown key {where}; check the spelling against "
                "vibectld.yaml(5)"
            )


def _prices(key: str, v: Any) -> dict[str, ModelPrice]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{key}: must map model names to {{input: USD, output: USD}}")
    prices = {}
    for model, entry in v.items():
        sec = _Section(entry, f"{key}.{_str(key, model)}")
        prices[model] = ModelPrice(
            input=sec.get("input", _price, 0.0), output=sec.get("output", _price, 0.0)
        )
        sec.finish()
    return prices


def _openai_compatible(key: str, v: Any) -> tuple[OpenAICompatibleModel, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise ConfigError(f"{key}: must be a list of endpoint entries")
    models = []
    for i, item in enumerate(v):
        sec = _Section(item, f"{key}[{i}]")
        models.append(
            OpenAICompatibleModel(
                model_id=sec.get("model_id", _str, ""),
                model_name=sec.get("model_name", _str, ""),
                api_base=sec.get("api_base", _str, ""),
                api_key_name=sec.get("api_key_name", _opt_str, None),
            )
        )
        sec.finish()
        for required in ("model_id", "model_name", "api_base"):
            if not getattr(models[-1], required):
                raise ConfigError(f"{sec.key(required)}: is required")
    return tuple(models)


def _server(srv: _Section, d: ServerConfig) -> ServerConfig:
    tls = srv.section("tls")
    tls_config = TLSConfig(
        cert_file=tls.get("cert_file", _opt_path, None),
        key_file=tls.get("key_file", _opt_path, None),
        client_ca_file=tls.get("client_ca_file", _opt_path, None),
    )
    tls.finish()
    if (tls_config.cert_file is None) != (tls_config.key_file is None):
        raise ConfigError(
            "server.tls: set both cert_file and key_file, or neither (then vibectld "
            "creates its own CA and certificate)"
        )
    return ServerConfig(
        listen=srv.get("listen", _listen, d.listen),
        public_url=srv.get("public_url", _public_url, None),
        name=srv.get("name", _str, d.name),
        tls=tls_config,
        max_request_bytes=srv.get("max_request_bytes", _int, d.max_request_bytes),
        max_concurrent_calls=srv.get("max_concurrent_calls", _int, d.max_concurrent_calls),
        shutdown_grace_seconds=srv.get(
            "shutdown_grace_seconds", _seconds, d.shutdown_grace_seconds
        ),
        workers=srv.get("workers", _workers, d.workers),
    )


def _admin(adm: _Section, d: AdminConfig) -> AdminConfig:
    return AdminConfig(
        socket=adm.get("socket", _path, d.socket), group=adm.get("group", _str, d.group)
    )


def _models(mod: _Section, d: ModelsConfig) -> ModelsConfig:
    return ModelsConfig(
        default=mod.get("default", _str, d.default),
        allowed=mod.get("allowed", _str_list, ()),
        aliases=mod.get("aliases", _str_map, {}),
        openai_compatible=mod.get("openai_compatible", _openai_compatible, ()),
        sync_workers=mod.get("sync_workers", _int, d.sync_workers),
        prices=mod.get("prices", _prices, {}),
    )


def _limits(lim: _Section, d: LimitsConfig) -> LimitsConfig:
    return LimitsConfig(
        requests_per_minute=lim.get("requests_per_minute", _limit, d.requests_per_minute),
        concurrent_requests=lim.get("concurrent_requests", _limit, d.concurrent_requests),
        tokens_per_day=lim.get("tokens_per_day", _limit, None),
        max_input_chars=lim.get("max_input_chars", _opt_int, d.max_input_chars),
        request_timeout_seconds=lim.get("request_timeout_seconds", _int, d.request_timeout_seconds),
        usd_per_month=lim.get("usd_per_month", _usd, None),
        server_usd_per_day=lim.get("server_usd_per_day", _usd, None),
    )


def _redaction(red: _Section, d: RedactionConfig) -> RedactionConfig:
    return RedactionConfig(
        mode=red.get("mode", _choice("redact", "refuse", "off"), d.mode),
        detectors=red.get("detectors", _detectors, d.detectors),
        custom=red.get("custom", _custom_rules, d.custom),
    )


def _clients(cli: _Section, d: ClientsConfig) -> ClientsConfig:
    clients = ClientsConfig(
        default_expiry_seconds=cli.get("default_expiry", _duration, d.default_expiry_seconds),
        max_expiry_seconds=cli.get("max_expiry", _duration, d.max_expiry_seconds),
        issuer=cli.get("issuer", _str, d.issuer),
        audience=cli.get("audience", _str, d.audience),
    )
    if clients.default_expiry_seconds > clients.max_expiry_seconds:
        raise ConfigError("clients.default_expiry: must not be longer than clients.max_expiry")
    return clients


def _logging(log: _Section, d: LoggingConfig) -> LoggingConfig:
    return LoggingConfig(
        level=log.get("level", _choice("debug", "info", "warning", "error"), d.level),
        format=log.get("format", _choice("auto", "console", "json", "journal"), d.format),
    )


def _metrics(met: _Section, d: MetricsConfig) -> MetricsConfig:
    return MetricsConfig(listen=met.get("listen", _opt_listen, d.listen))


def _storage(sto: _Section, d: StorageConfig) -> StorageConfig:
    storage = StorageConfig(
        backend=sto.get("backend", _choice("sqlite", "postgresql"), d.backend),
        max_staleness_seconds=sto.get("max_staleness", _interval, d.max_staleness_seconds),
        on_stale=sto.get("on_stale", _choice("serve", "refuse"), d.on_stale),
    )
    if storage.max_staleness_seconds < MIN_STALENESS_SECONDS:
        raise ConfigError(
            f"storage.max_staleness: must be at least {MIN_STALENESS_SECONDS:g}s (a node's "
            "view is brought up to date every 0.5 s); raise it"
        )
    return storage


# Each section of the file and the function that reads it, in the order of the file.
_SECTIONS: tuple[tuple[str, Callable[[_Section, Any], Any]], ...] = (
    ("server", _server),
    ("admin", _admin),
    ("models", _models),
    ("limits", _limits),
    ("redaction", _redaction),
    ("clients", _clients),
    ("logging", _logging),
    ("metrics", _metrics),
    ("storage", _storage),
)


def parse_config(raw: Any, config_path: Path | None = None) -> DaemonConfig:
    """Build a DaemonConfig from parsed YAML (a mapping, or None for all defaults)."""
    top = _Section(raw, "")
    defaults = DaemonConfig()
    parsed: dict[str, Any] = {}
    for name, read in _SECTIONS:
        section = top.section(name)
        parsed[name] = read(section, getattr(defaults, name))
        section.finish()
    state_dir = top.get("state_dir", _path, defaults.state_dir)
    top.finish()
    return DaemonConfig(**parsed, state_dir=state_dir, config_path=config_path)


def resolve_config_path(explicit: str | os.PathLike[str] | None) -> Path:
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> DaemonConfig:
    """Read and validate the YAML file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: no such file; create it (see vibectld.yaml(5)) or pass --config"
        ) from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    try:
        raw = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: is nested too deeply to be a vibectld config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{path}:{where}: not valid YAML: {problem}") from None
    return parse_config(raw, config_path=path.resolve())
