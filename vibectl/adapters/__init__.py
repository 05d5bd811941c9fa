"""get_model_adapter(): the only place that chooses between direct and proxy mode.

Proxy when a profile is active (or named with --proxy), direct otherwise, and
never a silent fallback from one to the other: if the proxy cannot be used,
the user is told why. Adapter modules are imported only when chosen, so proxy
mode never loads the llm library.
"""

from __future__ import annotations

from pathlib import Path

from vibectl.adapters.base import LLMMetrics, ModelAdapter
from vibectl.config import ClientConfig, ClientConfigError, ConfigStore
from vibectl.errors import ConfigurationError, UsageError

__all__ = ["LLMMetrics", "ModelAdapter", "get_model_adapter"]


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
        ca_pem = Path(profile.ca_file).read_bytes() if profile.ca_file else None
    except ClientConfigError as e:
        raise ConfigurationError(str(e)) from None
    except OSError as e:
        raise ConfigurationError(
            f"cannot read the CA file {profile.ca_file} of profile '{name}': {e.strerror}; "
            "run vibectl setup-proxy configure again"
        ) from None
    from vibectl.adapters.proxy import ProxyModelAdapter

    return ProxyModelAdapter(
        profile.host,
        profile.port,
        secret,
        ca_pem=ca_pem,
        insecure=profile.insecure,
        timeout=profile.timeout_seconds,
        connect_timeout=profile.connect_timeout_seconds,
    )
