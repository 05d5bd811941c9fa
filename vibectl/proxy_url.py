"""Parse and format ``vibectl-server://<secret>@<host>:<port>[?ca-sha256=<hex>]`` URLs.

The daemon formats these when it issues a client; the client parses what the
user pasted. Both sides use this one module so the grammar cannot drift.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from vibectl.util.hostport import join_host_port
from vibectl.util.masking import glimpse

SECURE_SCHEME = "vibectl-server"
INSECURE_SCHEME = "vibectl-server-insecure"
DEFAULT_PORT = 50051
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


class ProxyURLError(ValueError):
    """The URL is not a usable vibectl-server URL; the message says why."""


@dataclass(frozen=True)
class ProxyURL:
    host: str
    port: int
    secret: str | None = field(default=None, repr=False)
    insecure: bool = False
    ca_sha256: str | None = None

    @property
    def target(self) -> str:
        """host:port as gRPC wants it (IPv6 literals bracketed)."""
        return join_host_port(self.host, self.port)

    def format(self) -> str:
        scheme = INSECURE_SCHEME if self.insecure else SECURE_SCHEME
        auth = f"{quote(self.secret, safe='')}@" if self.secret else ""
        query = f"?{urlencode({'ca-sha256': self.ca_sha256})}" if self.ca_sha256 else ""
        return f"{scheme}://{auth}{self.target}{query}"

    def masked(self) -> str:
        """The URL with the secret hidden, for display."""
        shown = ProxyURL(self.host, self.port, None, self.insecure, self.ca_sha256).format()
        if not self.secret:
            return shown
        scheme, rest = shown.split("://", 1)
        return f"{scheme}://{glimpse(self.secret)}@{rest}"


def parse(url: str) -> ProxyURL:
    """Parse a pasted URL, raising ProxyURLError that names the problem."""
    text = url.strip()
    try:
        parts = urlsplit(text)
    except ValueError as e:
        raise ProxyURLError(f"not a valid URL: {e}") from None
    if parts.scheme not in (SECURE_SCHEME, INSECURE_SCHEME):
        raise ProxyURLError(
            f"the URL must start with {SECURE_SCHEME}:// (got '{parts.scheme or text[:20]}'); "
            "paste the whole line vibectl-admin issue-client printed"
        )
    if not parts.hostname:
        raise ProxyURLError(
            "the URL has no host; it should look like vibectl-server://SECRET@HOST:PORT"
        )
    try:
        port = parts.port
    except ValueError:
        raise ProxyURLError("the URL's port is not a number between 1 and 65535") from None
    if port == 0:
        raise ProxyURLError("the URL's port is not a number between 1 and 65535")
    secret = unquote(parts.username) if parts.username else None
    if parts.password is not None:
        raise ProxyURLError("the URL's secret must not contain ':'; copy it again exactly")
    pin: str | None = None
    query = parse_qs(parts.query, keep_blank_values=True)
    if "ca-sha256" in query:
        pin = query["ca-sha256"][0].lower().replace(":", "")
        if not _FINGERPRINT.match(pin):
            raise ProxyURLError(
                "the URL's ca-sha256 must be 64 hexadecimal characters (the CA's SHA-256); "
                "copy the URL again exactly"
            )
    return ProxyURL(
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        secret=secret,
        insecure=parts.scheme == INSECURE_SCHEME,
        ca_sha256=pin,
    )
