"""The private CA, the server certificate and operator-provided files, on real files."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from vibectld.config import TLSConfig
from vibectld.pki.tls import (
    ServerTLS,
    TLSError,
    ca_fingerprint,
    default_hosts,
    load_server_tls,
)

HOSTS = ["bastion.example.com", "localhost", "127.0.0.1", "::1"]
SELF = TLSConfig()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def certs(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def verify_for(server: ServerTLS, host: str) -> None:
    """Verify the served chain for `host` as a strict client trusting only ca_pem would."""
    assert server.ca_pem is not None
    leaf, *intermediates = certs(server.cert_chain_pem)
    store = Store(certs(server.ca_pem))
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        subject = x509.DNSName(host)
    verifier = PolicyBuilder().store(store).build_server_verifier(subject)
    verifier.verify(leaf, intermediates)


def test_self_managed_creates_ca_and_server_cert(tmp_path: Path) -> None:
    server = load_server_tls(SELF, tmp_path, HOSTS)

    d = tmp_path / "tls"
    assert mode(d) == 0o700
    assert mode(d / "ca.key") == 0o600
    assert mode(d / "server.key") == 0o600
    assert mode(d / "ca.pem") == 0o644
    assert mode(d / "server.pem") == 0o644
    assert not [p for p in d.iterdir() if p.name.startswith(".")]  # no temp files left

    ca = certs((d / "ca.pem").read_bytes())[0]
    assert server.ca_pem == (d / "ca.pem").read_bytes()
    assert server.key_pem == (d / "server.key").read_bytes()
    assert server.cert_chain_pem == (d / "server.pem").read_bytes() + server.ca_pem
    assert server.client_ca_pem is None

    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca and bc.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    cn = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "vibectld private CA (bastion.example.com)"
    assert ca.not_valid_after_utc - ca.not_valid_before_utc > dt.timedelta(days=3640)

    leaf = certs(server.cert_chain_pem)[0]
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc < dt.timedelta(days=825)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    for host in HOSTS:
        verify_for(server, host)


def test_sans_are_deduplicated_and_ips_are_ip_addresses(tmp_path: Path) -> None:
    hosts = ["Host.Example.com", "host.example.com", "10.0.0.7", "::1", "::1", "localhost"]
    server = load_server_tls(SELF, tmp_path, hosts)
    leaf = certs(server.cert_chain_pem)[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["host.example.com", "localhost"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("10.0.0.7"),
        ipaddress.ip_address("::1"),
    ]
    verify_for(server, "10.0.0.7")
    with pytest.raises(x509.verification.VerificationError):
        verify_for(server, "10.0.0.8")


def test_second_start_reuses_everything(tmp_path: Path) -> None:
    first = load_server_tls(SELF, tmp_path, HOSTS)
    second = load_server_tls(SELF, tmp_path, HOSTS)
    assert second == first
    # A subset of the hosts is still covered: nothing is re-issued.
    assert load_server_tls(SELF, tmp_path, HOSTS[:2]) == first


def test_new_host_reissues_server_cert_with_same_ca(tmp_path: Path) -> None:
    first = load_server_tls(SELF, tmp_path, HOSTS)
    second = load_server_tls(SELF, tmp_path, [*HOSTS, "new.example.com", "192.0.2.1"])
    assert second.ca_pem == first.ca_pem
    assert second.ca_sha256 == first.ca_sha256
    assert second.key_pem != first.key_pem
    assert second.cert_chain_pem != first.cert_chain_pem
    verify_for(second, "new.example.com")
    verify_for(second, "192.0.2.1")
    assert mode(tmp_path / "tls" / "server.key") == 0o600


def test_server_cert_near_expiry_is_reissued(tmp_path: Path) -> None:
    first = load_server_tls(SELF, tmp_path, HOSTS)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=710)
    second = load_server_tls(SELF, tmp_path, HOSTS, now=later)
    assert second.ca_pem == first.ca_pem
    assert certs(second.cert_chain_pem)[0].not_valid_after_utc > later + dt.timedelta(days=700)


def test_server_cert_from_another_ca_is_reissued(tmp_path: Path) -> None:
    first = load_server_tls(SELF, tmp_path / "a", HOSTS)
    load_server_tls(SELF, tmp_path / "b", HOSTS)
    # Swap in a valid certificate and key that another CA issued.
    for name in ("server.pem", "server.key"):
        (tmp_path / "a" / "tls" / name).write_bytes((tmp_path / "b" / "tls" / name).read_bytes())
    again = load_server_tls(SELF, tmp_path / "a", HOSTS)
    assert again.ca_pem == first.ca_pem
    verify_for(again, "bastion.example.com")


def test_garbage_server_files_are_reissued(tmp_path: Path) -> None:
    first = load_server_tls(SELF, tmp_path, HOSTS)
    (tmp_path / "tls" / "server.pem").write_bytes(b"garbage")
    again = load_server_tls(SELF, tmp_path, HOSTS)
    assert again.ca_pem == first.ca_pem
    verify_for(again, "localhost")


def test_missing_ca_key_when_reissue_needed_is_an_error(tmp_path: Path) -> None:
    load_server_tls(SELF, tmp_path, HOSTS)
    (tmp_path / "tls" / "ca.key").unlink()
    load_server_tls(SELF, tmp_path, HOSTS)  # nothing to issue: fine
    with pytest.raises(TLSError, match=r"ca\.key is missing"):
        load_server_tls(SELF, tmp_path, ["other.example.com"])


def test_invalid_host_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TLSError, match="bad host!"):
        load_server_tls(SELF, tmp_path, ["bad host!"])


def test_fingerprint_format(tmp_path: Path) -> None:
    server = load_server_tls(SELF, tmp_path, HOSTS)
    assert server.ca_pem is not None
    fp = ca_fingerprint(server.ca_pem)
    assert len(fp) == 64
    assert fp == fp.lower() and ":" not in fp
    int(fp, 16)
    der = certs(server.ca_pem)[0].public_bytes(serialization.Encoding.DER)
    assert fp == hashlib.sha256(der).hexdigest()
    assert server.ca_sha256 == fp
    # The first certificate counts: a chain's fingerprint is its leaf's.
    assert ca_fingerprint(server.cert_chain_pem) != fp
    with pytest.raises(ValueError):
        ca_fingerprint(b"not a cert")


def test_repr_hides_the_key(tmp_path: Path) -> None:
    server = load_server_tls(SELF, tmp_path, HOSTS)
    assert b"PRIVATE KEY" in server.key_pem
    assert "PRIVATE" not in repr(server)
    assert "key_pem" not in repr(server)


# Operator-provided files.


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject_key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    issuer_key: ec.EllipticCurvePrivateKey | None = None,
    issuer_cn: str | None = None,
    ca: bool = False,
    days: int = 90,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(issuer_cn or cn))
        .public_key(subject_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key or subject_key, hashes.SHA256())
    )


def _pem(*items: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    out = b""
    for item in items:
        if isinstance(item, x509.Certificate):
            out += item.public_bytes(serialization.Encoding.PEM)
        else:
            out += item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            )
    return out


def _operator(
    tmp_path: Path, chain: bytes, key: bytes, client_ca: bytes | None = None
) -> TLSConfig:
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(chain)
    key_file.write_bytes(key)
    client_ca_file = None
    if client_ca is not None:
        client_ca_file = tmp_path / "clients-ca.pem"
        client_ca_file.write_bytes(client_ca)
    return TLSConfig(cert_file=cert_file, key_file=key_file, client_ca_file=client_ca_file)


def test_operator_chain_to_public_root_has_no_ca(tmp_path: Path) -> None:
    root_key, inter_key, leaf_key = _key(), _key(), _key()
    inter = _cert(inter_key, "Inter", issuer_key=root_key, issuer_cn="Root", ca=True)
    leaf = _cert(leaf_key, "bastion", issuer_key=inter_key, issuer_cn="Inter")
    cfg = _operator(tmp_path, _pem(leaf, inter), _pem(leaf_key))

    server = load_server_tls(cfg, tmp_path / "state", HOSTS)
    assert certs(server.cert_chain_pem) == [leaf, inter]
    assert server.ca_pem is None and server.ca_sha256 is None
    key = serialization.load_pem_private_key(server.key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.private_numbers() == leaf_key.private_numbers()
    assert not (tmp_path / "state").exists()  # nothing self-managed was created


def test_operator_chain_ending_self_signed_gives_ca(tmp_path: Path) -> None:
    root_key, leaf_key = _key(), _key()
    root = _cert(root_key, "Corp Root", ca=True, days=3650)
    leaf = _cert(leaf_key, "bastion", issuer_key=root_key, issuer_cn="Corp Root")
    server = load_server_tls(_operator(tmp_path, _pem(leaf, root), _pem(leaf_key)), tmp_path, HOSTS)
    assert server.ca_pem == _pem(root)
    assert server.ca_sha256 == ca_fingerprint(_pem(root))


def test_operator_self_signed_leaf_is_its_own_ca(tmp_path: Path) -> None:
    key = _key()
    leaf = _cert(key, "bastion")
    server = load_server_tls(_operator(tmp_path, _pem(leaf), _pem(key)), tmp_path, HOSTS)
    assert server.ca_pem == _pem(leaf)


def test_operator_key_mismatch_names_both_files(tmp_path: Path) -> None:
    key = _key()
    cfg = _operator(tmp_path, _pem(_cert(key, "bastion")), _pem(_key()))
    with pytest.raises(TLSError) as err:
        load_server_tls(cfg, tmp_path, HOSTS)
    assert f"key_file {cfg.key_file} does not match cert_file {cfg.cert_file}" in str(err.value)


def test_operator_expired_cert(tmp_path: Path) -> None:
    key = _key()
    cfg = _operator(tmp_path, _pem(_cert(key, "bastion", days=-1)), _pem(key))
    with pytest.raises(TLSError, match=r"server\.tls\.cert_file: .* expired"):
        load_server_tls(cfg, tmp_path, HOSTS)


def test_operator_misordered_chain(tmp_path: Path) -> None:
    root_key, leaf_key = _key(), _key()
    root = _cert(root_key, "Root", ca=True)
    leaf = _cert(leaf_key, "bastion", issuer_key=root_key, issuer_cn="Root")
    other = _cert(_key(), "Unrelated", ca=True)
    cfg = _operator(tmp_path, _pem(leaf, other, root), _pem(leaf_key))
    with pytest.raises(TLSError, match="certificate 2 did not issue certificate 1"):
        load_server_tls(cfg, tmp_path, HOSTS)


@pytest.mark.parametrize("which", ["cert", "key", "client_ca"])
def test_operator_garbage_pem_names_file_and_key(tmp_path: Path, which: str) -> None:
    key = _key()
    good_cert, good_key = _pem(_cert(key, "bastion")), _pem(key)
    cfg = _operator(
        tmp_path,
        b"garbage" if which == "cert" else good_cert,
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
        if which == "key"
        else good_key,
        client_ca=b"garbage" if which == "client_ca" else None,
    )
    path = {"cert": cfg.cert_file, "key": cfg.key_file, "client_ca": cfg.client_ca_file}[which]
    with pytest.raises(TLSError) as err:
        load_server_tls(cfg, tmp_path, HOSTS)
    assert f"server.tls.{which}_file: {path}" in str(err.value)
    assert "AAAA" not in str(err.value)


def test_operator_missing_file(tmp_path: Path) -> None:
    cfg = TLSConfig(cert_file=tmp_path / "nope.pem", key_file=tmp_path / "nope.key")
    with pytest.raises(TLSError, match=r"server\.tls\.cert_file: cannot read .*nope\.pem"):
        load_server_tls(cfg, tmp_path, HOSTS)


def test_encrypted_key_is_explained(tmp_path: Path) -> None:
    key = _key()
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"pw"),
    )
    cfg = _operator(tmp_path, _pem(_cert(key, "bastion")), encrypted)
    with pytest.raises(TLSError, match="is encrypted"):
        load_server_tls(cfg, tmp_path, HOSTS)


def test_client_ca_is_loaded(tmp_path: Path) -> None:
    client_ca = _cert(_key(), "Client CA", ca=True)
    cfg = TLSConfig(client_ca_file=tmp_path / "clients.pem")
    (tmp_path / "clients.pem").write_bytes(b"comment line\n" + _pem(client_ca))
    server = load_server_tls(cfg, tmp_path, HOSTS)
    assert server.client_ca_pem == _pem(client_ca)
    assert server.ca_pem is not None  # still self-managed


def test_default_hosts() -> None:
    hosts = default_hosts("bastion.example.com")
    assert hosts[:4] == ["bastion.example.com", "localhost", "127.0.0.1", "::1"]
    assert len(hosts) == len(set(hosts))
    assert default_hosts("localhost")[:3] == ["localhost", "127.0.0.1", "::1"]
    assert default_hosts(None)[0] == "localhost"


def test_real_handshake_with_pinned_ca(tmp_path: Path) -> None:
    """A stock TLS client that trusts only ca_pem accepts the served chain for an IP SAN."""
    server = load_server_tls(SELF, tmp_path, HOSTS)
    assert server.ca_pem is not None
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"
    chain.write_bytes(server.cert_chain_pem)
    key.write_bytes(server.key_pem)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(chain, key)
    client_ctx = ssl.create_default_context(cadata=server.ca_pem.decode())

    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.sendall(b"ok")
        except BaseException as e:  # reported to the main thread below
            errors.append(e)

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(b, server_hostname="127.0.0.1") as c:
        assert c.recv(2) == b"ok"
    thread.join(timeout=10)
    assert not errors
