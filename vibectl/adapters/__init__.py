"""get_model_adapter(): the only place that chooses between direct and proxy mode.

Proxy when a profile is active (or named with --proxy), direct otherwise, and
never a silent fallback from one to the other: if the proxy cannot be used,
the user is told why. Adapter modules are imported only when chosen, so proxy
mode never loads the llm library.
"""

from __future__ import annotations

import contextlib
import ssl
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from vibectl.adapters.base import LLMMetrics, ModelAdapter
from vibectl.config import ClientConfig, ClientConfigError, ConfigStore, Profile
from vibectl.errors import (
    AuthenticationError,
    ConfigurationError,
    ServerUnavailableError,
    UsageError,
    VibectlError,
)
from vibectl.tls_pin import PinMismatch, pinned_ca, pinned_in_pem, verify_chain
from vibectl.util.hostport import join_host_port

if TYPE_CHECKING:
    from vibectl.adapters.proxy import ProxyModelAdapter

__all__ = [
    "LLMMetrics",
    "ModelAdapter",
    "fetch_pinned_ca",
    "get_model_adapter",
    "profile_ca",
    "proxy_adapter",
]


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
            f"add one with: vibectl setup-proxy configure - --name {name} (and paste the URL)"
        )
    try:
        secret = store.load_secret(name)
    except ClientConfigError as e:
        raise ConfigurationError(str(e)) from None
    return proxy_adapter(profile, secret, profile_ca(store, profile))


def profile_ca(store: ConfigStore, profile: Profile) -> bytes | None:
    """The CA certificates a profile trusts, or None for the system's trust store.

    A profile with a ca_sha256 pin trusts exactly the certificate with that
    fingerprint and never the system's store: a publicly trusted certificate for
    the same host must not receive the secret. The pinned certificate is looked
    for in the profile's ca_file and in client/ca/<profile>.pem; when neither has
    it (a migrated profile, a deleted or altered file), the server's chain is
    fetched again and checked against the pin before anything is sent.
    """
    if profile.insecure:
        return None
    if profile.ca_sha256 is None:
        return _read_ca(profile.name, profile.ca_file) if profile.ca_file else None
    own = str(store.ca_path(profile.name))
    for path in dict.fromkeys(p for p in (profile.ca_file, own) if p):
        with contextlib.suppress(OSError):
            found = pinned_in_pem(Path(path).read_bytes(), profile.ca_sha256)
            if found is not None:
                return found
    try:
        pem = pinned_ca(
            profile.host, profile.port, profile.ca_sha256, profile.connect_timeout_seconds
        )
    except PinMismatch as e:
        raise _pin_mismatch_error(profile.name, e) from None
    except OSError as e:  # ssl.SSLError included
        raise _unreachable(profile.host, profile.port, e) from None
    try:
        saved = store.save_ca(profile.name, pem)
    except ClientConfigError as e:
        # The pin was checked: this call is safe; only the next one will fetch again.
        print(f"vibectl: {e}", file=sys.stderr)
    else:
        print(
            f"vibectl: profile '{profile.name}' had no saved CA matching its pin; fetched the "
            f"server's CA again, checked it against the pin and saved it to {saved}",
            file=sys.stderr,
        )
    return pem


def fetch_pinned_ca(host: str, port: int, pin: str, timeout: float = 10.0) -> bytes:
    """The PEM of the server's CA whose SHA-256 is `pin` (from a URL), or a client error."""
    try:
        return pinned_ca(host, port, pin, timeout)
    except PinMismatch as e:
        raise AuthenticationError(
            f"the certificate of {e.target} does not match the CA pinned in the URL "
            f"({e.fingerprints}); nothing was saved. The URL is out of date (the CA was "
            "rebuilt) or names another server: ask your vibectld admin for a current URL"
        ) from None
    except OSError as e:  # ssl.SSLError included
        raise _unreachable(host, port, e) from None


def _pin_mismatch_error(profile: str, e: PinMismatch) -> AuthenticationError:
    """A saved profile's server no longer presents its pinned CA: the secret was not sent.

    Exit code 4 (like a refused secret): the profile's credentials no longer fit this
    server, and the fix is a new URL from the admin, not a retry.
    """
    return AuthenticationError(
        f"the certificate of {e.target} does not match the CA pinned in profile "
        f"'{profile}' ({e.fingerprints}); the secret was not sent. If the operator rebuilt "
        "the CA, get a new URL from them, run: vibectl setup-proxy configure - "
        f"--name {profile} and paste it"
    )


def _unreachable(host: str, port: int, e: OSError) -> ServerUnavailableError:
    return ServerUnavailableError(
        f"cannot reach vibectld at {join_host_port(host, port)}: {e}; is the server "
        "running and the address right?"
    )


def _trust_check(
    profile: Profile, ca_pem: bytes | None
) -> Callable[[float], VibectlError | None] | None:
    """What explains a failed connection, if the server's certificate does.

    gRPC reports a certificate it refuses like a server it cannot reach (UNAVAILABLE,
    retried until the connect timeout), so after a failed attempt the adapter asks this
    check, which handshakes itself: a pinned profile compares the server's chain with
    the pin, one with a CA file verifies the chain against it. Not for the system's
    trust store: gRPC's roots are not Python's, and the two could disagree.
    """
    if profile.insecure or (profile.ca_sha256 is None and ca_pem is None):
        return None
    name, host, port, pin = profile.name, profile.host, profile.port, profile.ca_sha256

    def check(timeout: float) -> VibectlError | None:
        try:
            if pin is not None:
                pinned_ca(host, port, pin, timeout)
            elif ca_pem is not None:
                verify_chain(host, port, ca_pem, timeout)
        except PinMismatch as e:
            return _pin_mismatch_error(name, e)
        except ssl.SSLCertVerificationError as e:
            trusted = f"the CA file {profile.ca_file}" if profile.ca_file else "the --ca-bundle"
            return AuthenticationError(
                f"the certificate of {join_host_port(host, port)} fails {trusted}: "
                f"{e.verify_message}; the secret was not sent. If the operator changed the "
                "server's CA, get the new CA file from them, run: vibectl setup-proxy "
                f"configure - --ca-bundle FILE --name {name} and paste the URL"
            )
        except OSError:
            pass  # no handshake (down, restarting): the adapter reports it as unreachable
        return None

    return check


def _read_ca(profile: str, ca_file: str) -> bytes:
    try:
        return Path(ca_file).read_bytes()
    except OSError as e:
        raise ConfigurationError(
            f"cannot read the CA file {ca_file} of profile '{profile}': "
            f"{e.strerror}; run vibectl setup-proxy configure again"
        ) from None


def proxy_adapter(
    profile: Profile, secret: str, ca_pem: bytes | None, *, max_timeout: float | None = None
) -> ProxyModelAdapter:
    """The proxy adapter for a profile; `max_timeout` caps its per-call deadline."""
    from vibectl.adapters.proxy import ProxyModelAdapter

    if profile.ca_sha256 and not profile.insecure and ca_pem is None:
        # gRPC would use the system's trust store: the pin would be silently ignored.
        raise ConfigurationError(
            f"profile '{profile.name}' is pinned to a CA but none was given; refusing to "
            "trust the system's certificates instead"
        )
    timeout = profile.timeout_seconds
    return ProxyModelAdapter(
        profile.host,
        profile.port,
        secret,
        ca_pem=ca_pem,
        insecure=profile.insecure,
        timeout=min(timeout, max_timeout) if max_timeout is not None else timeout,
        connect_timeout=profile.connect_timeout_seconds,
        explain_failure=_trust_check(profile, ca_pem),
    )
