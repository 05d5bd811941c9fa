"""The server's TLS material: a private CA and server certificate, or the operator's files.

When ``server.tls.cert_file``/``key_file`` are unset, vibectld keeps its own CA in
``<state_dir>/tls/``, or, when several nodes share a PostgreSQL database, uses the
cluster's one CA (kept sealed in the database, held in memory: cluster.py). Clients pin
that CA by the SHA-256 of its DER encoding (the ``ca-sha256`` URL parameter), so the CA
is created once and never replaced automatically; only the server certificate (always
in ``<state_dir>/tls/server.pem``, its key 0600 beside it) is re-issued when it no
longer fits.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import itertools
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vibectl.util.files import atomic_write, ensure_private_dir
from vibectld.config import TLSConfig

CA_VALIDITY = dt.timedelta(days=3650)
# Under the 825 days some TLS clients (Apple's) accept for any server certificate.
SERVER_VALIDITY = dt.timedelta(days=730)
RENEW_BEFORE = dt.timedelta(days=30)
# Tolerates clients whose clocks run a little behind ours.
BACKDATE = dt.timedelta(minutes=5)


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class TLSError(Exception):
    """TLS material is missing or unusable; the message names the file and what to do."""


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA that issues this node's server certificate, given to `load_server_tls` when
    it does not live in ``<state_dir>/tls/`` (a cluster's, from its database)."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    # Where it is kept, for messages: "the cluster's database".
    where: str

    @classmethod
    def create(cls, first_host: str, where: str, now: dt.datetime | None = None) -> Self:
        key = ec.generate_private_key(ec.SECP256R1())
        return cls(_make_ca(key, first_host, now or dt.datetime.now(dt.UTC)), key, where)

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.cert)


@dataclass(frozen=True)
class ServerTLS:
    # What the gRPC server presents: the leaf, then intermediates (and our CA).
    cert_chain_pem: bytes
    key_pem: bytes = field(repr=False)
    # The CA clients must trust; None when the certificate is (assumed) publicly trusted.
    ca_pem: bytes | None
    # Clients must present a certificate from this CA (mTLS) when set.
    client_ca_pem: bytes | None = None

    @property
    def ca_sha256(self) -> str | None:
        return ca_fingerprint(self.ca_pem) if self.ca_pem is not None else None

    def renewal_due(self, now: dt.datetime | None = None) -> bool:
        """True when the served certificate expires within RENEW_BEFORE.

        A reload then renews a self-managed certificate; an operator's file is only
        re-read, and the reload's log says it expires.
        """
        leaf = x509.load_pem_x509_certificate(self.cert_chain_pem)
        now = now or dt.datetime.now(dt.UTC)
        return leaf.not_valid_after_utc <= now + RENEW_BEFORE


def ca_fingerprint(pem: bytes) -> str:
    """Lowercase hex SHA-256 over the DER of the first certificate in `pem` (no colons)."""
    try:
        cert = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise ValueError("no PEM certificate found to fingerprint") from None
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def default_hosts(public_host: str | None) -> list[str]:
    """The names a self-managed server certificate covers, most important first."""
    candidates = [public_host] if public_host else []
    candidates += ["localhost", "127.0.0.1", "::1"]
    # The machine's own names are guesses: leave out any a certificate cannot carry.
    candidates += [n for n in (socket.gethostname(), socket.getfqdn()) if n and _san(n)]
    hosts: list[str] = []
    for host in candidates:
        if host not in hosts:
            hosts.append(host)
    return hosts


def load_server_tls(
    tls: TLSConfig,
    state_dir: Path,
    hosts: Sequence[str],
    *,
    now: dt.datetime | None = None,
    ca: CertificateAuthority | None = None,
) -> ServerTLS:
    """Load (or, when self-managed, create) everything the TLS listener needs.

    A self-managed certificate is issued by `ca` when given, else by the CA in
    ``state_dir/tls/``; operator-provided files ignore `ca`.
    """
    now = now or dt.datetime.now(dt.UTC)
    if tls.cert_file is None and tls.key_file is None:
        directory = state_dir / "tls"
        try:
            server = _self_managed(directory, hosts, now, ca)
        except OSError as e:
            raise TLSError(
                f"cannot set up the private CA in {directory}: {e.filename or directory}: "
                f"{e.strerror or e}; check that the directory belongs to the vibectld user"
            ) from None
    elif tls.cert_file is not None and tls.key_file is not None:
        server = _operator_provided(tls.cert_file, tls.key_file, now)
    else:
        raise TLSError("server.tls: set both cert_file and key_file, or neither")
    if tls.client_ca_file is None:
        return server
    client_ca = _read_certs(tls.client_ca_file, "server.tls.client_ca_file")
    return replace(server, client_ca_pem=_pem(*client_ca))


# Operator-provided certificate and key.


def _operator_provided(cert_file: Path, key_file: Path, now: dt.datetime) -> ServerTLS:
    chain = _read_certs(cert_file, "server.tls.cert_file")
    key = _read_key(key_file, "server.tls.key_file")
    leaf = chain[0]
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise TLSError(
            f"server.tls: key_file {key_file} does not match cert_file {cert_file}; "
            "point both at the same certificate's files"
        )
    if leaf.not_valid_after_utc <= now:
        raise TLSError(
            f"server.tls.cert_file: {cert_file} expired on {leaf.not_valid_after_utc:%Y-%m-%d}; "
            "renew the certificate and reload vibectld"
        )
    if leaf.not_valid_before_utc > now:
        raise TLSError(
            f"server.tls.cert_file: {cert_file} is not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock"
        )
    for i, (child, parent) in enumerate(itertools.pairwise(chain), start=1):
        if not _issued_by(child, parent):
            raise TLSError(
                f"server.tls.cert_file: in {cert_file}, certificate {i + 1} did not issue "
                f"certificate {i}; put the server certificate first, then each issuer in order"
            )
    # A chain ending in a self-signed certificate names the CA clients must trust;
    # otherwise the chain leads to a root the clients already have.
    ca = chain[-1] if _issued_by(chain[-1], chain[-1]) else None
    return ServerTLS(
        cert_chain_pem=_pem(*chain),
        key_pem=_key_pem(key),
        ca_pem=_pem(ca) if ca is not None else None,
    )


def _read_bytes(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise TLSError(
            f"{key}: cannot read {path}: {e.strerror or e}; check the path and that "
            "the vibectld user may read it"
        ) from None


def _read_certs(path: Path, key: str) -> list[x509.Certificate]:
    data = _read_bytes(path, key)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError(
            f"{key}: {path} holds no valid PEM certificate (expected "
            "-----BEGIN CERTIFICATE----- blocks)"
        ) from None


def _read_key(path: Path, key: str) -> PrivateKeyTypes:
    data = _read_bytes(path, key)
    # The underlying errors are never shown: they could quote parts of the key.
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TLSError(
            f"{key}: {path} is encrypted; vibectld needs an unencrypted PEM key that only "
            "the vibectld user can read"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError(f"{key}: {path} holds no valid PEM private key") from None


# Self-managed CA and server certificate.


def _self_managed(
    directory: Path, hosts: Sequence[str], now: dt.datetime, ca: CertificateAuthority | None
) -> ServerTLS:
    names = _parse_hosts(hosts)
    if not names:
        raise TLSError("no host names for the server certificate; set server.public_url")
    ensure_private_dir(directory)
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    if ca is None:
        ca_cert = _local_ca_cert(directory, hosts, now)
    else:
        ca_cert = ca.cert
        if ca_cert.not_valid_after_utc <= now + RENEW_BEFORE:
            raise TLSError(
                f"the private CA in {ca.where} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
                "see Replacing the CA in vibectld(8): every client then needs a new URL"
            )

    if not _server_cert_fits(cert_path, key_path, ca_cert, names, now):
        ca_key = (
            ca.key if ca is not None else _read_ca_key(directory / "ca.key", ca_cert, directory)
        )
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _make_server_cert(key, ca_key, ca_cert, names, now)
        # Key first: a crash between the writes leaves a mismatch that the next start repairs.
        atomic_write(key_path, _key_pem(key), 0o600)
        atomic_write(cert_path, _pem(cert), 0o644)

    return ServerTLS(
        cert_chain_pem=cert_path.read_bytes() + _pem(ca_cert),
        key_pem=key_path.read_bytes(),
        ca_pem=_pem(ca_cert),
    )


def _local_ca_cert(directory: Path, hosts: Sequence[str], now: dt.datetime) -> x509.Certificate:
    """The certificate of the CA in `directory`, created with its key if there is none."""
    ca_cert_path, ca_key_path = directory / "ca.pem", directory / "ca.key"
    if not ca_cert_path.exists():
        # No certificate means no client can have pinned this CA yet, so a stray
        # ca.key (from a start interrupted between the two writes) is replaced.
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _make_ca(ca_key, hosts[0] if hosts else "vibectld", now)
        atomic_write(ca_key_path, _key_pem(ca_key), 0o600)
        atomic_write(ca_cert_path, _pem(ca_cert), 0o644)
    ca_cert = _read_certs(ca_cert_path, "the private CA certificate")[0]
    if ca_cert.not_valid_after_utc <= now + RENEW_BEFORE:
        raise TLSError(
            f"the private CA {ca_cert_path} expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}; "
            f"move {directory} aside and restart to create a new CA, then issue every "
            "client a new URL (the CA fingerprint changes)"
        )
    return ca_cert


def _read_ca_key(
    path: Path, ca_cert: x509.Certificate, directory: Path
) -> ec.EllipticCurvePrivateKey:
    what_to_do = (
        f"restore it from a backup, or move {directory} aside and restart to create a new "
        "CA (every client then needs a new URL)"
    )
    if not path.exists():
        raise TLSError(f"the private CA key {path} is missing; {what_to_do}")
    key = _read_key(path, "the private CA key")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key.public_key()) != _spki(
        ca_cert.public_key()
    ):
        raise TLSError(
            f"the private CA key {path} does not match {path.with_suffix('.pem')}; {what_to_do}"
        )
    return key


def _server_cert_fits(
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    names: list[x509.GeneralName],
    now: dt.datetime,
) -> bool:
    """Whether the existing server certificate can be served as it is."""
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm, x509.ExtensionNotFound):
        # These files are ours: anything unreadable is simply issued again.
        return False
    return (
        _spki(cert.public_key()) == _spki(key.public_key())
        and _issued_by(cert, ca_cert)
        and cert.not_valid_before_utc <= now
        and cert.not_valid_after_utc > now + RENEW_BEFORE
        and all(name in sans for name in names)
    )


def _make_ca(
    key: ec.EllipticCurvePrivateKey, first_host: str, now: dt.datetime
) -> x509.Certificate:
    # A common name is limited to 64 characters.
    label = f"vibectld private CA ({first_host[:40]})"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )


def _make_server_cert(
    key: ec.EllipticCurvePrivateKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: list[x509.GeneralName],
    now: dt.datetime,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(names[0].value)[:64])])
    not_after = min(now + SERVER_VALIDITY, ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _parse_hosts(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """SAN entries for `hosts`, deduplicated: IP literals as IPAddress, the rest as DNSName."""
    names: list[x509.GeneralName] = []
    for host in hosts:
        name = _san(host)
        if name is None:
            raise TLSError(
                f"cannot put host {host!r} in the server certificate: it is neither an IP "
                "address nor a valid DNS name; fix the host in server.public_url"
            )
        if name not in names:
            names.append(name)
    return names


def _san(host: str) -> x509.GeneralName | None:
    text = host.strip().rstrip(".").lower()
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        pass
    else:
        return x509.IPAddress(ip)
    try:
        ascii_name = text.encode("idna").decode("ascii")
    except UnicodeError:
        return None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        return None
    return x509.DNSName(ascii_name)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _spki(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
