"""DaemonConfig: the one configuration object, frozen dataclasses handed to every part.

Also what a reload may change of it (RESTART_ONLY) and the warnings a loaded
configuration earns. Reading it from the YAML file is config_file.py's.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from vibectld.config_values import (
    ConfigError as ConfigError,  # re-exported: every reader of the config raises it
)


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

# Keys a reload applies when lowered, but not raised above their value at start: gRPC's
# receive limit (the request size plus a margin, grpc_server.py) is fixed when the
# server is built, so a larger request would meet gRPC's refusal, not the service's.
RESTART_TO_RAISE: tuple[str, ...] = ("server.max_request_bytes",)


def restart_only_changes(
    old: DaemonConfig, new: DaemonConfig, started: DaemonConfig | None = None
) -> list[str]:
    """The keys whose change between two configurations only a restart can apply;
    `started` is the configuration the process started with (default `old`)."""
    changed = [key for key in RESTART_ONLY if _lookup(old, key) != _lookup(new, key)]
    changed += [
        key
        for key in RESTART_TO_SWITCH
        if (_lookup(old, key) is None) != (_lookup(new, key) is None)
    ]
    at_start = old if started is None else started
    changed += [key for key in RESTART_TO_RAISE if _lookup(new, key) > _lookup(at_start, key)]
    return changed


def keep_restart_only(
    old: DaemonConfig, new: DaemonConfig, started: DaemonConfig | None = None
) -> DaemonConfig:
    """`new`, with every key whose change needs a restart set back to its value in `old`."""
    kept = new
    for key in restart_only_changes(old, new, started):
        kept = _with(kept, key.split("."), _lookup(old, key))
    return kept


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
