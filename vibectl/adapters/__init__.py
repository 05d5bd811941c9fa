"""get_model_adapter(): the only place that chooses between direct and proxy mode.

Proxy when a profile is active (or named with --proxy), direct otherwise, and
never a silent fallback from one to the other: if the proxy cannot be used,
the user is told why. Adapter modules are imported only when chosen, so proxy
mode never loads the llm library.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vibectl.adapters.base import LLMMetrics, ModelAdapter
from vibectl.config import ClientConfig, ClientConfigError, ConfigStore, Profile
from vibectl.errors import ConfigurationError, UsageError

if TYPE_CHECKING:
    from vibectl.adapters.proxy import ProxyModelAdapter

__all__ = ["LLMMetrics", "ModelAdapter", "get_model_adapter", "profile_ca", "proxy_adapter"]


def get_model_adapter(
    store: ConfigStore,
    config: ClientConfig,
    *,
    proxy: str | None = None,
    no_proxy: bool = False,
) -> ModelAdapter:
    if proxy and no_proxy:
        raise UsageError("--proxy and --no-proxy contradict each other; use one")
    name = None if no_proxy else (proxy or config.active_profile)
    if name is None:
        from vibectl.adapters.direct import LLMModelAdapter

        return LLMModelAdapter(config.model)
    profile = config.profiles.get(name)
    if profile is None:
        known = ", ".join(sorted(config.profiles)) or "none"
        raise ConfigurationError(
            f"no proxy profile named '{name}' (profiles: {known}); "
            "add one with: vibectl setup-proxy configure URL"
        )
    try:
        secret = store.load_secret(name)
    except ClientConfigError as e:
        raise ConfigurationError(str(e)) from None
    return proxy_adapter(profile, secret, profile_ca(profile))


def profile_ca(profile: Profile) -> bytes | None:
    """The CA a profile trusts (its saved pin or bundle), or None for the system's store."""
    if not profile.ca_file:
        return None
    try:
        return Path(profile.ca_file).read_bytes()
    except OSError as e:
        raise ConfigurationError(
            f"cannot read the CA file {profile.ca_file} of profile '{profile.name}': "
            f"{e.strerror}; run vibectl setup-proxy configure again"
        ) from None


def proxy_adapter(
    profile: Profile, secret: str, ca_pem: bytes | None, *, max_timeout: float | None = None
) -> ProxyModelAdapter:
    """The proxy adapter for a profile; `max_timeout` caps its per-call deadline."""
    from vibectl.adapters.proxy import ProxyModelAdapter

    timeout = profile.timeout_seconds
    return ProxyModelAdapter(
        profile.host,
        profile.port,
        secret,
        ca_pem=ca_pem,
        insecure=profile.insecure,
        timeout=min(timeout, max_timeout) if max_timeout is not None else timeout,
        connect_timeout=profile.connect_timeout_seconds,
    )
