"""The CA and signing keys of several nodes sharing one PostgreSQL database.

Every private key the database holds is sealed with the cluster key (sealed.py), under a
purpose naming its row, so a sealed value copied into another row does not open there.
The rows (also written by ``vibectl-admin storage migrate``; keep both to this format):

- cluster_secrets 'check': public_pem NULL, sealed = seal(CHECK_PLAINTEXT, "check"). A
  node whose cluster-key does not open it is refused at start.
- cluster_secrets 'ca': public_pem = the CA certificate's PEM, sealed = seal(the CA's
  private key as PKCS#8 DER, "ca").
- signing_keys: one row per kid, sealed = seal(the Ed25519 key as PKCS#8 DER,
  "signing_key KID"), created_at = the time in the kid, retired_at NULL or unix time.

The first node to start writes the check, the CA and a first signing key, under one
advisory lock, so nodes starting together on an empty database make one of each; later
nodes find and open them. Each node holds the opened keys in memory only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import structlog
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vibectld.pki.kids import (
    LoadedKeys,
    SigningKeyError,
    already_retired,
    current_key,
    kid_created_at,
    new_kid,
    private_der,
    unknown,
)
from vibectld.pki.sealed import CHECK_PLAINTEXT, ClusterKey, ClusterKeyError
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import CertificateAuthority
from vibectld.store.base import Transaction
from vibectld.store.feed import SIGNING_KEY, record_change
from vibectld.store.records import RegistryError

log = structlog.get_logger("vibectld.signing")

T = TypeVar("T")

# Held while the cluster's secrets are created or its signing keys change.
LOCK = "vibectld cluster state"
CA_ROW = "ca"
CHECK_ROW = "check"
WHERE = "the cluster's PostgreSQL database"
# A reload that fails (the database away) is tried again this often, this many times;
# the feed's catch-up after a gap calls again anyway.
RETRY_SECONDS = 1.0
RETRIES = 30


class SharedDatabase(Protocol):
    """What this module needs of the store: one committed transaction at a time."""

    def transact(self, work: Callable[[Transaction], T]) -> T: ...


# -- the row formats -----------------------------------------------------------------------


def signing_key_purpose(kid: str) -> str:
    return f"signing_key {kid}"


def seal_check(cluster_key: ClusterKey) -> bytes:
    return cluster_key.seal(CHECK_PLAINTEXT, CHECK_ROW)


def open_check(cluster_key: ClusterKey, sealed: bytes) -> None:
    """Return if `sealed` is the check of this cluster key; ClusterKeyError if not."""
    if cluster_key.open(sealed, CHECK_ROW) != CHECK_PLAINTEXT:
        raise ClusterKeyError("the stored check is not vibectld's; is this vibectld's database?")


def seal_ca(cluster_key: ClusterKey, ca: CertificateAuthority) -> tuple[str, bytes]:
    """The 'ca' row's public_pem and sealed values."""
    der = ca.key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return ca.cert_pem.decode("ascii"), cluster_key.seal(der, CA_ROW)


def open_ca(cluster_key: ClusterKey, public_pem: str, sealed: bytes) -> CertificateAuthority:
    """The CA of the 'ca' row; ClusterKeyError if it does not open or is not a CA's."""
    der = cluster_key.open(sealed, CA_ROW)
    try:
        cert = x509.load_pem_x509_certificate(public_pem.encode("ascii"))
        key = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError, UnicodeEncodeError, UnsupportedAlgorithm):
        # The loader's own errors are not shown: they could quote parts of the key.
        raise ClusterKeyError(f"the CA in {WHERE} is not a certificate and its key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or _spki(key) != _spki_of(cert):
        raise ClusterKeyError(f"the CA key in {WHERE} does not match its certificate")
    return CertificateAuthority(cert, key, WHERE)


def seal_signing_key(cluster_key: ClusterKey, kid: str, key: Ed25519PrivateKey) -> bytes:
    return cluster_key.seal(private_der(key), signing_key_purpose(kid))


def open_signing_key(cluster_key: ClusterKey, kid: str, sealed: bytes) -> Ed25519PrivateKey:
    """The key of a signing_keys row; SigningKeyError (naming the kid) if it does not open."""
    try:
        der = cluster_key.open(sealed, signing_key_purpose(kid))
        key = serialization.load_der_private_key(der, password=None)
    except ClusterKeyError as e:
        raise SigningKeyError(str(e)) from None
    except (ValueError, TypeError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(
            f"the signing key {kid} in {WHERE} is not an Ed25519 key; retire it on a node "
            "that still has it, or restore the database"
        )
    return key


def insert_signing_key(
    tx: Transaction, cluster_key: ClusterKey, kid: str, key: Ed25519PrivateKey
) -> None:
    """Add a key's row, and tell the other nodes through the change feed."""
    created = kid_created_at(kid)
    assert created is not None, "a kid made by new_kid carries its time"
    tx.execute(
        "INSERT INTO signing_keys (kid, sealed, created_at, retired_at) VALUES (?, ?, ?, NULL)",
        (kid, seal_signing_key(cluster_key, kid, key), created),
    )
    record_change(tx, SIGNING_KEY, kid, int(time.time()))


# -- joining the cluster -------------------------------------------------------------------


def join(db: SharedDatabase, cluster_key: ClusterKey, first_host: str) -> CertificateAuthority:
    """Check this node's cluster key against the database and return the cluster's CA,
    creating the check and the CA (named after `first_host`) if this node is the first.

    ClusterKeyError when the key is not the cluster's: the message says what to do.
    """

    def work(tx: Transaction) -> CertificateAuthority:
        # Nodes starting together queue here: the first writes, the others read its rows.
        tx.lock(LOCK)
        rows = tx.select(
            "SELECT name, public_pem, sealed FROM cluster_secrets WHERE name IN (?, ?)",
            (CHECK_ROW, CA_ROW),
        )
        found: dict[str, tuple[Any, bytes]] = {name: (pem, bytes(s)) for name, pem, s in rows}
        now = int(time.time())
        ca: CertificateAuthority | None = None
        if CA_ROW in found:
            pem, sealed = found[CA_ROW]
            if CHECK_ROW in found:
                open_check(cluster_key, found[CHECK_ROW][1])
            ca = open_ca(cluster_key, pem, sealed)
        elif CHECK_ROW in found:
            # A cluster grown from a node whose TLS files were the operator's has no CA yet.
            open_check(cluster_key, found[CHECK_ROW][1])
        if CHECK_ROW not in found:
            tx.execute(
                "INSERT INTO cluster_secrets (name, public_pem, sealed, created_at) "
                "VALUES (?, NULL, ?, ?)",
                (CHECK_ROW, seal_check(cluster_key), now),
            )
        if ca is None:
            ca = CertificateAuthority.create(first_host, WHERE)
            public_pem, sealed = seal_ca(cluster_key, ca)
            tx.execute(
                "INSERT INTO cluster_secrets (name, public_pem, sealed, created_at) "
                "VALUES (?, ?, ?, ?)",
                (CA_ROW, public_pem, sealed, now),
            )
        return ca

    return db.transact(work)


# -- the signing keys ----------------------------------------------------------------------


class DatabaseKeys:
    """The KeyBacking of a cluster: sealed rows of signing_keys, changed under LOCK."""

    shared = True

    def __init__(self, db: SharedDatabase, cluster_key: ClusterKey) -> None:
        self._db = db
        self._key = cluster_key

    def __repr__(self) -> str:
        return "DatabaseKeys(postgresql)"

    def load(self) -> LoadedKeys:
        def work(tx: Transaction) -> list[tuple[Any, ...]]:
            rows = tx.select("SELECT kid, sealed, retired_at FROM signing_keys")
            if any(retired_at is None for _, _, retired_at in rows):
                return rows
            # None verifies yet (a new cluster): make the first, one node at a time.
            tx.lock(LOCK)
            rows = tx.select("SELECT kid, sealed, retired_at FROM signing_keys")
            if not any(retired_at is None for _, _, retired_at in rows):
                kid, key = self._insert(tx, max((r[0] for r in rows), default=None))
                rows.append((kid, seal_signing_key(self._key, kid, key), None))
            return rows

        rows = self._db.transact(work)
        keys = {
            kid: open_signing_key(self._key, kid, bytes(sealed))
            for kid, sealed, retired_at in rows
            if retired_at is None
        }
        retired = frozenset(kid for kid, _, retired_at in rows if retired_at is not None)
        return LoadedKeys(keys, retired)

    def add(self, latest: str | None) -> tuple[str, Ed25519PrivateKey]:
        def work(tx: Transaction) -> tuple[str, Ed25519PrivateKey]:
            tx.lock(LOCK)
            newest = tx.select("SELECT max(kid) FROM signing_keys")[0][0]
            # After every kid, this node's and the database's (another node may be ahead).
            return self._insert(tx, max((k for k in (latest, newest) if k), default=None))

        return self._db.transact(work)

    def retire(self, kid: str) -> None:
        def work(tx: Transaction) -> None:
            tx.lock(LOCK)
            rows = tx.select("SELECT kid, retired_at FROM signing_keys")
            verifying = sorted(k for k, retired_at in rows if retired_at is None)
            if kid in {k for k, retired_at in rows if retired_at is not None}:
                raise already_retired(kid)
            if kid not in verifying:
                raise unknown(kid)
            # The newest key signs on every node: the cluster's, not this node's view.
            if kid == verifying[-1]:
                raise current_key(kid, only=len(verifying) == 1)
            now = int(time.time())
            tx.execute("UPDATE signing_keys SET retired_at = ? WHERE kid = ?", (now, kid))
            record_change(tx, SIGNING_KEY, kid, now)

        self._db.transact(work)

    def _insert(self, tx: Transaction, latest: str | None) -> tuple[str, Ed25519PrivateKey]:
        kid, key = new_kid(latest), Ed25519PrivateKey.generate()
        insert_signing_key(tx, self._key, kid, key)
        return kid, key


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki_of(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class KeyFollower:
    """Reloads a node's signing keys when the change feed says a key was made or retired,
    and tells `on_retired` which kids stopped verifying (their clients' calls end).

    `changed` is the store's on_key_change callback, called on the feed's thread: the
    reload (a database read) runs on a thread of its own, so it never holds the feed back
    (a revocation behind it, say). Changes arriving during a reload make one more reload,
    not one each: a reload reads every key.
    """

    def __init__(
        self,
        signing: SigningKeys,
        on_retired: Callable[[frozenset[str]], None] | None = None,
    ) -> None:
        self._signing = signing
        # Called (on the reload's thread) with the kids a reload found retired elsewhere.
        self._on_retired = on_retired
        self._lock = threading.Lock()
        self._running = False
        self._again = False

    def changed(self, kid: str) -> None:
        with self._lock:
            if self._running:
                self._again = True
                return
            self._running = True
        threading.Thread(target=self._reload, name="vibectld-keys", daemon=True).start()

    def _reload(self) -> None:
        failures = 0
        while True:
            try:
                retired = self._signing.refresh()
            except (RegistryError, SigningKeyError) as e:
                failures += 1
                if failures > RETRIES:
                    log.error(
                        "signing_keys.reload_failed",
                        error=str(e),
                        hint="this node may still accept a key retired on another node; "
                        "restart it once the database answers",
                    )
                    with self._lock:
                        self._running = self._again = False
                    return
                time.sleep(RETRY_SECONDS)
                continue
            failures = 0
            log.info("signing_keys.reloaded", kids=len(self._signing.kids))
            if retired and self._on_retired is not None:
                self._on_retired(retired)
            with self._lock:
                if not self._again:
                    self._running = False
                    return
                self._again = False
