"""Copying one node's SQLite store into an empty PostgreSQL database: how one vibectld
becomes the first of several (`vibectl-admin storage migrate --to postgresql`).

What is copied is everything a secret already handed out depends on, so that nobody's
secret or URL has to be reissued: the clients (with their kids, limits and revocations),
usage and redaction counts, the audit trail, the signing keys (retired ones stay
retired) and the self-managed CA, whose fingerprint every URL pins. The private keys go
into the database sealed with the cluster key, in the rows a PostgreSQL node opens at
start (schema version 2), written with the same functions (pki/cluster.py):

- cluster_secrets 'ca': the CA certificate's PEM, and its private key as PKCS#8 DER
  sealed for the purpose "ca"; 'check': CHECK_PLAINTEXT sealed for "check";
- signing_keys: one row per kid, the Ed25519 key as PKCS#8 DER sealed for
  "signing_key KID", created_at the time in the kid, retired_at set for a retired key.

The copy is one PostgreSQL transaction, run inside one SQLite write transaction: nothing
this node writes meanwhile (an issue, a flush) can fall between the two, and a failure
leaves the target as it was. The target must be empty; a second run, or a database a
PostgreSQL node has already started on, is refused.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from vibectld.pki import cluster
from vibectld.pki.key_files import RETIRED_DIR, load_key
from vibectld.pki.kids import SigningKeyError, is_kid, kid_created_at
from vibectld.pki.sealed import ClusterKey
from vibectld.pki.tls import CertificateAuthority, ca_fingerprint
from vibectld.store import audit
from vibectld.store.base import Transaction
from vibectld.store.records import RegistryError, StorageFailure
from vibectld.store.registry import Registry

# A second migration into the same database (from another node, say) waits for the first
# and then finds the target no longer empty.
MIGRATE_LOCK = "vibectld storage migrate"

# The tables copied row for row, with every column both engines have (clients'
# updated_at and updated_by too, which the mirror does not load).
_TABLES: dict[str, tuple[str, ...]] = {
    "clients": (
        "id",
        "name",
        "created_at",
        "expires_at",
        "issued_by",
        "note",
        "models",
        "rpm",
        "concurrency",
        "tokens_per_day",
        "revoked_at",
        "revoked_by",
        "revoke_reason",
        "last_seen_at",
        "requests",
        "updated_at",
        "updated_by",
        "kid",
        "usd_per_month",
    ),
    "usage": (
        "client_id",
        "day",
        "requests",
        "errors",
        "input_tokens",
        "output_tokens",
        "cost_usd",
    ),
    "redactions": ("client_id", "day", "kind", "count"),
    # The ids are kept, so the trail keeps its order and `audit` lists the same rows.
    "audit": ("id", "at", "caller_uid", "caller_user", "op", "target", "outcome", "detail"),
    # Which usage-journal segments the usage rows hold (store/journal.py): copied with
    # them, so a segment left on disk is never replayed into the copy a second time.
    "usage_journals": ("journal", "applied", "at"),
}
# Each table's primary key, the order it is read in, a page at a time.
_KEYS: dict[str, tuple[str, ...]] = {
    "clients": ("id",),
    "usage": ("client_id", "day"),
    "redactions": ("client_id", "day", "kind"),
    "audit": ("id",),
    "usage_journals": ("journal",),
}
# Rows read and written at a time: some 200 kB of JSON.
ROWS_PER_PAGE = 1000
# Any row in one of these means the database is in use: copying over it would mix two
# installations' clients or, worse, two CAs.
_MUST_BE_EMPTY = ("clients", "usage", "audit", "signing_keys", "cluster_secrets")


class MigrationError(RegistryError):
    """The store cannot be copied (files unreadable, CA not the one served); says why."""


class TargetNotEmpty(MigrationError):
    """The PostgreSQL database already holds a registry or a cluster's keys."""


@dataclass(frozen=True)
class SealedKey:
    kid: str
    sealed: bytes = field(repr=False)
    created_at: int
    retired_at: int | None


@dataclass(frozen=True)
class ClusterFiles:
    """This node's CA and signing keys, read from its files and sealed for the database."""

    ca_pem: str | None  # None: the operator provides TLS; there is no CA to copy
    ca_sealed: bytes | None = field(repr=False)
    ca_sha256: str | None
    keys: tuple[SealedKey, ...]
    # CHECK_PLAINTEXT sealed with the same key: a node whose cluster-key opens it may use
    # the rest.
    check: bytes = field(repr=False)


@dataclass(frozen=True)
class Copied:
    """What a migration wrote, table by table."""

    clients: int
    usage: int
    redactions: int
    audit: int
    signing_keys: int  # those that verify
    retired_signing_keys: int
    ca_sha256: str | None  # the CA copied (the URLs' pin), or None without one

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the files: the CA and the signing keys ---------------------------------------------


def read_cluster_files(
    state_dir: Path, key: ClusterKey, *, serving_ca_sha256: str | None, self_managed: bool
) -> ClusterFiles:
    """The CA (when vibectld manages it) and every signing key under `state_dir`, sealed.

    `serving_ca_sha256` is the fingerprint of the CA this node serves (its URLs' pin): the
    files must hold that CA, or the copy would break every URL handed out.
    """
    ca_pem = ca_sealed = ca_sha256 = None
    if self_managed:
        ca_pem, ca_sealed, ca_sha256 = _sealed_ca(state_dir / "tls", key)
        if ca_sha256 != serving_ca_sha256:
            raise MigrationError(
                f"the CA in {state_dir / 'tls'} is not the one this node serves (its "
                "certificate changed since the start); restart vibectld, then migrate"
            )
    keys = _sealed_signing_keys(state_dir, key)
    return ClusterFiles(ca_pem, ca_sealed, ca_sha256, keys, cluster.seal_check(key))


def _sealed_ca(directory: Path, key: ClusterKey) -> tuple[str, bytes, str]:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    try:
        pem, key_data = cert_path.read_bytes(), key_path.read_bytes()
    except OSError as e:
        raise MigrationError(
            f"cannot read the private CA {e.filename}: {e.strerror or e}; the CA must be "
            "copied so that the URLs already issued keep their ca-sha256 pin"
        ) from None
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise MigrationError(f"{cert_path} holds no valid PEM certificate") from None
    # The loader's own errors are never shown: they could quote parts of the key.
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise MigrationError(f"{key_path} is not an unencrypted PEM private key") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise MigrationError(f"the private CA key {key_path} is not an EC key, as vibectld makes")
    if _spki(private.public_key()) != _spki(cert.public_key()):
        raise MigrationError(f"the private CA key {key_path} does not match {cert_path}")
    # The row's format is the cluster's (pki/cluster.py), which the nodes open.
    public_pem, sealed = cluster.seal_ca(key, CertificateAuthority(cert, private, str(directory)))
    return public_pem, sealed, ca_fingerprint(public_pem.encode("ascii"))


def _sealed_signing_keys(state_dir: Path, key: ClusterKey) -> tuple[SealedKey, ...]:
    """Every key that verifies, and every retired one (a kid in both places is retired,
    as SigningKeys loads them)."""
    directory = state_dir / "signing-keys"
    retired_dir = directory / RETIRED_DIR
    try:
        retired = {p.stem: p for p in retired_dir.glob("*.pem") if is_kid(p.stem)}
        current = {p.stem: p for p in directory.glob("*.pem") if is_kid(p.stem)}
    except OSError as e:
        raise MigrationError(f"cannot list {directory}: {e.strerror or e}") from None
    if not set(current) - set(retired):
        raise MigrationError(f"{directory} holds no signing key that verifies")
    rows = []
    for kid, path in sorted({**current, **retired}.items()):
        created = kid_created_at(kid)
        assert created is not None  # is_kid above: every kid carries its time
        retired_at = None
        if kid in retired:
            path = retired[kid]
            # A retirement moves the file, which changes its inode's ctime (not its mtime):
            # the nearest record of when it happened.
            retired_at = _changed_at(path)
        sealed = cluster.seal_signing_key(key, kid, _ed25519(path))
        rows.append(SealedKey(kid, sealed, created, retired_at))
    return tuple(rows)


def _ed25519(path: Path) -> Ed25519PrivateKey:
    """The key file as a node loads it (key_files.load_key), failing as a migration."""
    try:
        return load_key(path)
    except SigningKeyError as e:
        raise MigrationError(str(e)) from None


def _changed_at(path: Path) -> int:
    try:
        return int(os.stat(path).st_ctime)
    except OSError:
        return int(time.time())


def _spki(public: Any) -> bytes:
    return bytes(
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


# -- the copy -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """Who asked, for the audit row the copy adds to the cluster's trail."""

    uid: int | None
    user: str


class _TargetFailed(Exception):
    """The target's StorageFailure, carried out of the source's transaction: raised
    there as it is, it would mark this node's own (healthy) store degraded."""

    def __init__(self, failure: StorageFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def copy_to_postgresql(
    registry: Registry, dsn: str, files: ClusterFiles, caller: Caller, *, now: int | None = None
) -> tuple[Copied, str]:
    """Copy `registry` (SQLite) and `files` into the empty database of `dsn`.

    Returns what was copied and the target's description (never the DSN). Blocks on both
    databases: call it from a worker thread. TargetNotEmpty, MigrationError,
    StorageFailure (the target cannot be reached or written).
    """
    if registry.backend != "sqlite":
        raise MigrationError("this node's store is already PostgreSQL: there is nothing to copy")
    # The counts of calls already served go in; later ones stay in SQLite (see the CLI).
    registry.flush()
    # psycopg takes ~0.3 s to import: only a daemon that migrates pays for it here.
    from vibectld.store.postgresql import PostgreSQLDatabase

    try:
        target = PostgreSQLDatabase.open(dsn)  # creates the schema: the same one nodes create
    except StorageFailure as e:
        raise StorageFailure(f"nothing was copied: {e}") from None
    try:
        # Early, before this node's registry is locked for the copy (checked again inside).
        try:
            _refuse_unless_empty(target.query, target.where)
        except StorageFailure as e:
            raise StorageFailure(f"nothing was copied: {e}") from None
        at = int(time.time()) if now is None else now

        def copy(source: Transaction) -> Copied:
            try:
                return target.transaction(
                    lambda tx: _copy(source, tx, files, caller, at, target.where)
                )
            except StorageFailure as e:
                raise _TargetFailed(e) from None

        try:
            copied = registry.transact(copy)
        except _TargetFailed as e:
            # A connection lost during COMMIT leaves it unknown whether the copy is there.
            raise StorageFailure(
                f"the copy did not finish: {e.failure}; run storage migrate again (a copy "
                "that was committed after all is then refused as not empty)"
            ) from None
        return copied, target.where
    finally:
        target.close()


def _copy(
    source: Transaction,
    tx: Transaction,
    files: ClusterFiles,
    caller: Caller,
    now: int,
    where: str,
) -> Copied:
    tx.lock(MIGRATE_LOCK)
    _refuse_unless_empty(tx.select, where)
    counts: dict[str, int] = {}
    for table, columns in _TABLES.items():
        counts[table] = _copy_table(source, tx, table, columns)
    # New audit rows continue after the copied ids (an identity does not look at them).
    tx.select(
        "SELECT setval(pg_get_serial_sequence('audit', 'id'), "
        "(SELECT COALESCE(MAX(id), 0) + 1 FROM audit), false)"
    )
    copied = Copied(
        clients=counts["clients"],
        usage=counts["usage"],
        redactions=counts["redactions"],
        audit=counts["audit"],
        signing_keys=sum(k.retired_at is None for k in files.keys),
        retired_signing_keys=sum(k.retired_at is not None for k in files.keys),
        ca_sha256=files.ca_sha256,
    )
    secrets: list[Sequence[Any]] = [(cluster.CHECK_ROW, None, files.check, now)]
    if files.ca_pem is not None and files.ca_sealed is not None:
        secrets.append((cluster.CA_ROW, files.ca_pem, files.ca_sealed, now))
    tx.executemany(
        "INSERT INTO cluster_secrets (name, public_pem, sealed, created_at) VALUES (?, ?, ?, ?)",
        secrets,
    )
    tx.executemany(
        "INSERT INTO signing_keys (kid, sealed, created_at, retired_at) VALUES (?, ?, ?, ?)",
        [(k.kid, k.sealed, k.created_at, k.retired_at) for k in files.keys],
    )
    # The cluster's trail says where its first rows came from (this node's own record of
    # the operation goes to its SQLite trail, after the copy).
    detail = (
        f"copied from SQLite: {copied.clients} clients, {copied.usage} usage rows, "
        f"{copied.redactions} redaction rows, {copied.audit} audit rows, "
        f"{len(files.keys)} signing keys, {'the CA' if files.ca_pem else 'no CA'}"
    )
    row = (now, caller.uid, caller.user, "storage_migrate", "postgresql", "ok", detail)
    tx.execute(audit.INSERT_SQL, audit.insert_row(row))
    return copied


def _copy_table(source: Transaction, tx: Transaction, table: str, columns: Sequence[str]) -> int:
    """Copy `table` a page at a time, in the order of its primary key; the rows copied.

    A page is read after the last key of the one before (not with OFFSET, which rereads),
    and written as one JSON parameter that the server unpacks (json_populate_recordset):
    binding each value as a parameter of its own cost psycopg 40 s of adapting for
    410,000 rows. Pages keep memory flat whatever the store's size, and keep each stretch
    of C work that holds the GIL (encoding a page) short, for the event loop's sake.
    """
    key = _KEYS[table]
    names, order = ", ".join(columns), ", ".join(key)
    read, page = f"SELECT {names} FROM {table}", f"ORDER BY {order} LIMIT {ROWS_PER_PAGE}"  # noqa: S608
    first = f"{read} {page}"
    after = f"{read} WHERE ({order}) > ({', '.join('?' * len(key))}) {page}"
    # The audit id is an identity column: the old ids are kept (OVERRIDING).
    overriding = " OVERRIDING SYSTEM VALUE" if table == "audit" else ""
    insert = (
        f"INSERT INTO {table} ({names}){overriding} SELECT {names} "  # noqa: S608
        f"FROM json_populate_recordset(NULL::{table}, ?::json)"
    )
    at = [columns.index(k) for k in key]
    copied = 0
    rows = source.select(first)
    while rows:
        tx.execute(insert, (json.dumps([dict(zip(columns, row, strict=True)) for row in rows]),))
        copied += len(rows)
        if len(rows) < ROWS_PER_PAGE:
            break
        rows = source.select(after, [rows[-1][i] for i in at])
    return copied


def _refuse_unless_empty(select: Callable[[str], list[tuple[Any, ...]]], where: str) -> None:
    used = [t for t in _MUST_BE_EMPTY if select(f"SELECT 1 FROM {t} LIMIT 1")]  # noqa: S608
    if used:
        raise TargetNotEmpty(
            f"{where} is not empty (it holds {', '.join(used)}): storage migrate copies "
            "into an empty database only; create a new database and point the "
            "postgresql-dsn credential at it"
        )
