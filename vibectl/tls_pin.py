"""Trust on a pin: fetch a server's certificate chain and keep the CA whose SHA-256 is pinned.

The connection URL carries ``ca-sha256=<hex>`` of the server's private CA, so
a client can verify the server with nothing but the pasted URL: it reads the
chain the server presents (unverified), finds the certificate with that
fingerprint, and from then on trusts exactly that CA.
"""

from __future__ import annotations

import hashlib
import re
import socket
import ssl
from typing import Any

from vibectl.util.hostport import join_host_port

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+?-----END CERTIFICATE-----"
)


def short_fingerprint(fingerprint: str) -> str:
    """The first 16 hex digits: enough to tell two CAs apart, short enough to read."""
    return f"{fingerprint[:16]}…"


class PinMismatch(Exception):
    """No certificate in the server's chain has the pinned fingerprint.

    `presented` is the SHA-256 of the last certificate of the chain, which is the
    CA when the server sends it (vibectld does): the fingerprint a current URL
    would carry. None when the server sent no certificate at all.
    """

    def __init__(self, target: str, expected: str, presented: str | None) -> None:
        self.target = target
        self.expected = expected.lower()
        self.presented = presented
        super().__init__(
            f"the certificate of {target} does not match the URL's ca-sha256 pin "
            f"({self.fingerprints}); nothing was saved — check the URL with your vibectld admin"
        )

    @property
    def fingerprints(self) -> str:
        got = short_fingerprint(self.presented) if self.presented else "no certificate"
        return f"expected sha256 {short_fingerprint(self.expected)}, got {got}"


def _chain_der(tls: ssl.SSLSocket) -> list[bytes]:
    # Python 3.13 made this public; 3.11 and 3.12 have it on the underlying object.
    getter: Any = getattr(tls, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(tls, "_sslobj").get_unverified_chain  # noqa: B009
    chain = getter() or []
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


def fetch_chain(host: str, port: int, timeout: float = 10.0) -> list[bytes]:
    """The DER certificates the server presents, leaf first, without verifying them."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        return _chain_der(tls)


def verify_chain(host: str, port: int, ca_pem: bytes, timeout: float = 10.0) -> None:
    """A TLS handshake that trusts only `ca_pem` and checks the host name, as gRPC does.

    ssl.SSLCertVerificationError says why the server's certificate fails; any other
    OSError means no handshake took place (down, refused, not TLS).
    """
    ctx = ssl.create_default_context(cadata=ca_pem.decode("ascii", "replace"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=host),
    ):
        pass


def _pinned(ders: list[bytes], pin: str) -> bytes | None:
    for der in ders:
        if hashlib.sha256(der).hexdigest() == pin.lower():
            return ssl.DER_cert_to_PEM_cert(der).encode()
    return None


def pinned_in_pem(pem: bytes, pin: str) -> bytes | None:
    """The PEM of the one certificate in `pem` whose SHA-256 equals `pin`, or None.

    A saved CA file (or a user's bundle) is trusted only through its pinned
    certificate: anything else in the file, or a file someone swapped, is ignored.
    """
    ders = []
    for block in _PEM_CERTIFICATE.findall(pem):
        try:
            ders.append(ssl.PEM_cert_to_DER_cert(block.decode("ascii")))
        except ValueError:  # bad base64 (binascii.Error is a ValueError)
            continue
    return _pinned(ders, pin)


def pinned_ca(host: str, port: int, pin: str, timeout: float = 10.0) -> bytes:
    """The PEM of the server's CA whose SHA-256 equals `pin`, or PinMismatch.

    OSError (ssl.SSLError included) when no TLS handshake could be completed.
    """
    chain = fetch_chain(host, port, timeout)
    found = _pinned(chain, pin)
    if found is not None:
        return found
    presented = hashlib.sha256(chain[-1]).hexdigest() if chain else None
    raise PinMismatch(join_host_port(host, port), pin, presented)
