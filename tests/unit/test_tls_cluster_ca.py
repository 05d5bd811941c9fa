"""A node of a cluster: its server certificate issued by the cluster's CA (held in memory,
kept in the database), on real files for the node's own certificate and key."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from vibectld.config import TLSConfig
from vibectld.pki.tls import CertificateAuthority, ServerTLS, TLSError, load_server_tls

HOSTS = ["lb.example.test", "localhost", "127.0.0.1"]
SELF = TLSConfig()
WHERE = "the cluster's PostgreSQL database"


def leaf_of(server: ServerTLS) -> x509.Certificate:
    return x509.load_pem_x509_certificates(server.cert_chain_pem)[0]


def verify_for(server: ServerTLS, ca: CertificateAuthority, host: str) -> None:
    """A strict client trusting only the cluster's CA accepts the chain for `host`."""
    leaf, *rest = x509.load_pem_x509_certificates(server.cert_chain_pem)
    verifier = PolicyBuilder().store(Store([ca.cert])).build_server_verifier(x509.DNSName(host))
    verifier.verify(leaf, rest)


def test_nodes_of_one_ca_serve_one_pin_and_write_no_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("lb.example.test", WHERE)
    one = load_server_tls(SELF, tmp_path / "one", HOSTS, ca=ca)
    two = load_server_tls(SELF, tmp_path / "two", [*HOSTS, "node-two.internal"], ca=ca)
    assert one.ca_pem == two.ca_pem == ca.cert_pem
    assert one.ca_sha256 == two.ca_sha256
    verify_for(one, ca, "lb.example.test")
    verify_for(two, ca, "lb.example.test")
    verify_for(two, ca, "node-two.internal")
    for node in ("one", "two"):
        tls = tmp_path / node / "tls"
        assert sorted(p.name for p in tls.iterdir()) == ["server.key", "server.pem"]
        assert stat.S_IMODE((tls / "server.key").stat().st_mode) == 0o600
    assert "key=" not in repr(ca)


def test_a_restart_reuses_the_node_s_certificate(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("lb.example.test", WHERE)
    first = load_server_tls(SELF, tmp_path, HOSTS, ca=ca)
    assert load_server_tls(SELF, tmp_path, HOSTS, ca=ca) == first


def test_a_certificate_of_the_node_s_own_ca_is_reissued_by_the_cluster_s(tmp_path: Path) -> None:
    alone = load_server_tls(SELF, tmp_path, HOSTS)  # a single node, its CA in state_dir/tls
    ca = CertificateAuthority.create("lb.example.test", WHERE)
    joined = load_server_tls(SELF, tmp_path, HOSTS, ca=ca)
    assert joined.ca_pem == ca.cert_pem != alone.ca_pem
    verify_for(joined, ca, "lb.example.test")


def test_renewal_near_expiry_keeps_the_cluster_s_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("lb.example.test", WHERE)
    first = load_server_tls(SELF, tmp_path, HOSTS, ca=ca)
    assert not first.renewal_due()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=710)
    assert first.renewal_due(later)
    renewed = load_server_tls(SELF, tmp_path, HOSTS, now=later, ca=ca)
    assert renewed.ca_sha256 == first.ca_sha256
    assert leaf_of(renewed).not_valid_after_utc > later + dt.timedelta(days=700)


def test_an_expiring_cluster_ca_names_the_database(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("lb.example.test", WHERE)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=3640)
    with pytest.raises(TLSError, match="the private CA in the cluster's PostgreSQL database"):
        load_server_tls(SELF, tmp_path, HOSTS, now=later, ca=ca)


def test_the_operator_s_files_are_served_as_on_one_node(tmp_path: Path) -> None:
    # The operator's certificate: here one issued by a CA of their own, chain in the file.
    theirs = load_server_tls(SELF, tmp_path / "operator", HOSTS)
    files = tmp_path / "operator" / "tls"
    (files / "chain.pem").write_bytes(theirs.cert_chain_pem)
    operator = TLSConfig(cert_file=files / "chain.pem", key_file=files / "server.key")
    cluster_ca = CertificateAuthority.create("lb.example.test", WHERE)
    served = load_server_tls(operator, tmp_path / "node", HOSTS, ca=cluster_ca)
    assert served.cert_chain_pem == theirs.cert_chain_pem
    assert served.ca_pem == theirs.ca_pem != cluster_ca.cert_pem
    assert not (tmp_path / "node" / "tls").exists()
