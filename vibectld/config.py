"""DaemonConfig and load_config(): the only reader of the YAML file and the environment.

Loading is pure: it validates and normalises, but binds nothing and builds no
TLS context. Every error names the dotted key and what is wrong with it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

import yaml

from vibectld.config_values import (  # the value readers, one per kind of value
    ConfigError as ConfigError,  # re-exported: every reader of the config raises it
)
from vibectld.config_values import (
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


@dataclass(frozen=True)
class TLSConfig:
    cert_file: Path | None = None
    key_file: Path | None = None
    # When set, clients must present a certificate signed by this CA (mTLS).
    client_ca_file: Path | None = None

    @property
    def self_managed(self) -> bool:
        return self.cert_file is None and self.key_file is None


@dataclass(frozen=True)
class ServerConfig:
    listen: str = "0.0.0.0:50051"
    public_url: str | None = None
    name: str = field(default_factory=socket.gethostname)
    tls: TLSConfig = field(default_factory=TLSConfig)
    max_request_bytes: int = 1024 * 1024
    # Calls and streams in progress on the whole server; past it RESOURCE_EXHAUSTED.
    max_concurrent_calls: int = 4096
    shutdown_grace_seconds: float = 10.0
    # Serving processes on the one port; `auto`: the CPUs this process may use.
    workers: int | Literal["auto"] = "auto"

    @property
    def public_host(self) -> str | None:
        return urlsplit(self.public_url).hostname if self.public_url else None

    @property
    def public_port(self) -> int | None:
        return urlsplit(self.public_url).port if self.public_url else None


@dataclass(frozen=True)
class AdminConfig:
    socket: Path = Path("/run/vibectld/admin.sock")
    group: str = "vibectld-admin"


@dataclass(frozen=True)
class OpenAICompatibleModel:
    model_id: str
    model_name: str
    api_base: str
    api_key_name: str | None = None


@dataclass(frozen=True)
class ModelPrice:
    """USD per million tokens."""

    input: float
    output: float


@dataclass(frozen=True)
class ModelsConfig:
    default: str = "gpt-4o-mini"
    allowed: tuple[str, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    openai_compatible: tuple[OpenAICompatibleModel, ...] = ()
    # Threads for models that only have a synchronous implementation.
    sync_workers: int = 8
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)


@dataclass(frozen=True)
class LimitsConfig:
    requests_per_minute: int | None = 60
    concurrent_requests: int | None = 4
    tokens_per_day: int | None = None
    max_input_chars: int | None = 200_000
    request_timeout_seconds: int = 120
    # Dollars per client per UTC calendar month (issue-client --usd-per-month overrides).
    usd_per_month: float | None = None
    # Dollars per UTC day, summed over every client.
    server_usd_per_day: float | None = None


@dataclass(frozen=True)
class RedactionConfig:
    """Secrets out of every prompt, enforced here whatever client sent it (service/redaction.py)."""

    # redact: replace them before the provider; refuse: INVALID_ARGUMENT naming the kinds; off.
    mode: str = "redact"
    # "all", or the built-in detectors to use (vibectl.redaction.KINDS).
    detectors: str | tuple[str, ...] = "all"
    # (name, regex) rules, already checked by vibectl.redaction_rules.validate_custom.
    custom: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ClientsConfig:
    default_expiry_seconds: int = 90 * 86400
    max_expiry_seconds: int = 2 * 365 * 86400
    # The `iss` and `aud` claims of issued secrets.
    issuer: str = "vibectld"
    audience: str = "vibectl-llm-proxy"


@dataclass(frozen=True)
class MetricsConfig:
    # HOST:PORT for the Prometheus endpoint; None keeps it off.
    listen: str | None = None


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "info"
    format: str = "auto"


# The least storage.max_staleness may be: a node's view is brought up to date every 0.5 s
# (the change feed's catch-up read), so anything shorter would call a healthy node stale.
MIN_STALENESS_SECONDS = 1.0


@dataclass(frozen=True)
class StorageConfig:
    # sqlite: state_dir/registry.db; postgresql: the postgresql-dsn credential's database.
    backend: str = "sqlite"
    # postgresql: how old this node's view of the shared store may be before it is stale.
    max_staleness_seconds: float = 5.0
    # What a stale node does with calls: serve the clients it knows, or refuse them all
    # with UNAVAILABLE (after Teleport's best_effort and strict locking modes).
    on_stale: str = "serve"


@dataclass(frozen=True)
class DaemonConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    state_dir: Path = Path("/var/lib/vibectld")
    models: ModelsConfig = field(default_factory=ModelsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    redaction: RedactionConfig = field(default_factory=RedactionConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # Where the file was read from; keys/ beside it is a provider-key source.
    config_path: Path | None = None

    @property
    def config_dir(self) -> Path | None:
        return self.config_path.parent if self.config_path else None


# Keys a reload cannot apply, each bound to something made once at start: the listening
# socket, the admin socket, the state directory, the model thread pool, the log pipeline,
# the metrics endpoint, the shutdown grace read by the signal handler, the store. Declared once: a
# reload keeps their old values and names each one that changed, and the test of
# vibectld.yaml(5) checks the page marks exactly these "Reload: needs a restart".
RESTART_ONLY: tuple[str, ...] = (
    "server.listen",
    "server.shutdown_grace_seconds",
    "server.workers",
    "admin.socket",
    "admin.group",
    "state_dir",
    "models.sync_workers",
    "logging.level",
    "logging.format",
    "metrics.listen",
    "storage.backend",
    # Not storage.max_staleness nor storage.on_stale: the call gate, the health service
    # and the admin routes read them from the current generation, so a reload applies
    # them (an operator may switch on_stale during an outage).
)


def _lookup(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _with(config: Any, parts: list[str], value: Any) -> Any:
    head, *rest = parts
    new = _with(getattr(config, head), rest, value) if rest else value
    return dataclasses.replace(config, **{head: new})


# Keys a reload applies while they stay set (or unset), but whose switch between null
# and a value needs a restart: whether TLS clients must present a certificate is fixed
# when the port is bound.
RESTART_TO_SWITCH: tuple[str, ...] = ("server.tls.client_ca_file",)


def restart_only_changes(old: DaemonConfig, new: DaemonConfig) -> list[str]:
    """The keys whose change between two configurations only a restart can apply."""
    changed = [key for key in RESTART_ONLY if _lookup(old, key) != _lookup(new, key)]
    changed += [
        key
        for key in RESTART_TO_SWITCH
        if (_lookup(old, key) is None) != (_lookup(new, key) is None)
    ]
    return changed


def keep_restart_only(old: DaemonConfig, new: DaemonConfig) -> DaemonConfig:
    """`new`, with every key whose change needs a restart set back to its value in `old`."""
    kept = new
    for key in restart_only_changes(old, new):
        kept = _with(kept, key.split("."), _lookup(old, key))
    return kept


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


def unpriced_budget_warnings(
    config: DaemonConfig, offered: Iterable[str] | None = None
) -> list[str]:
    """Warnings about dollar budgets that models without a price would meet.

    A model without a price in models.prices is refused where a dollar budget applies
    (it could not be counted). `offered` is the catalogue's model ids when the daemon
    knows them; without it (--check-config) the models the file names are checked.
    Budgets set on clients (issue-client --usd-per-month) live in the registry, not
    here: only the file's keys are considered.
    """
    limits = config.limits
    keys = [
        key
        for key, value in (
            ("limits.usd_per_month", limits.usd_per_month),
            ("limits.server_usd_per_day", limits.server_usd_per_day),
        )
        if value is not None
    ]
    if not keys:
        return []
    models = config.models
    who = (
        "every client is refused them"
        if limits.server_usd_per_day is not None
        else "clients with a dollar budget are refused them"
    )
    warnings = []
    if offered is None:
        offered = [
            models.default,
            *models.allowed,
            *models.aliases.values(),
            *(m.model_id for m in models.openai_compatible),
        ]
        if not models.allowed:
            warnings.append(
                "models.allowed is empty, so every model with a provider key is offered; "
                f"with {' and '.join(keys)} set, {who} unless models.prices has their price "
                "— list the models in models.allowed, or price each one"
            )
    unpriced = sorted({m for m in offered if m not in models.prices})
    if unpriced:
        warnings.insert(
            0,
            f"models.prices: no price for {', '.join(unpriced)}; with {' and '.join(keys)} "
            f"set, {who} (PERMISSION_DENIED) — add their prices (0 for a free model)",
        )
    return warnings


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
