"""The client registry: one row per issued secret, kept in SQLite and mirrored in memory.

The database is the record and memory is a cache of it: a change is committed (WAL,
synchronous=FULL) before memory changes and before the caller hears of it, so an
acknowledged issue or revocation survives a crash. Reads on the request path never
touch the disk. Usage counters (`touch`) are the one exception to write-first: they
change memory at once and reach the disk in batches (`flush`), since losing a few
seconds of counts in a crash is cheap and a write per request is not.

The registry holds a secret's metadata only, never the secret.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

NAME_RULE = (
    "a client name is 1 to 64 characters: letters, digits, '.', '_', '@' and '-', "
    "starting with a letter or digit"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_LIST_HINT = "list them with: vibectl-admin list-clients --all"

_COLUMNS = (
    "id, name, created_at, expires_at, issued_by, note, models, rpm, concurrency, "
    "tokens_per_day, revoked_at, revoked_by, revoke_reason, last_seen_at, requests"
)


class RegistryError(Exception):
    """A registry operation failed; the message says why and what to do."""


class ClientNotFound(RegistryError):
    pass


class DuplicateClient(RegistryError):
    pass


class AlreadyRevoked(RegistryError):
    pass


@dataclass(frozen=True)
class ClientRecord:
    id: str  # the secret's jti
    name: str
    created_at: int
    expires_at: int
    issued_by: str
    note: str | None = None
    models: tuple[str, ...] | None = None  # None: every model the server allows
    rpm: int | None = None  # None (for each limit): the configured default
    concurrency: int | None = None
    tokens_per_day: int | None = None
    revoked_at: int | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    last_seen_at: int | None = None
    requests: int = 0

    def status(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self, now: int) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models) if self.models is not None else None
        data["status"] = self.status(now)
        return data


def _migrate_v1(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE clients (
            id TEXT PRIMARY KEY NOT NULL,
            name TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER NOT NULL,
            issued_by TEXT NOT NULL,
            note TEXT,
            models TEXT,  -- a JSON list of model names, or NULL for the server's list
            rpm INTEGER,
            concurrency INTEGER,
            tokens_per_day INTEGER,
            revoked_at INTEGER,
            revoked_by TEXT,
            revoke_reason TEXT,
            last_seen_at INTEGER,
            requests INTEGER NOT NULL DEFAULT 0
        )
        """
    )
    db.execute("CREATE INDEX clients_name ON clients (name)")


# MIGRATIONS[i] takes the schema from version i to i + 1. Append; never edit a shipped one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_v1,)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to SCHEMA_VERSION, one transaction per step."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise RegistryError(
            f"{path} has schema version {version}, newer than this vibectld knows "
            f"({SCHEMA_VERSION}); run the newer vibectld, or restore a backup of the file"
        )
    for step in range(version, SCHEMA_VERSION):
        db.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[step](db)
            # user_version is part of the database header, so it commits with the step.
            db.execute(f"PRAGMA user_version = {step + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise


class Registry:
    def __init__(self, db: sqlite3.Connection, path: Path, records: dict[str, ClientRecord]):
        self._db: sqlite3.Connection | None = db
        self._path = path
        self._records = records
        self._pending: set[str] = set()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Registry(path={str(self._path)!r}, clients={len(self._records)})"

    @classmethod
    def open(cls, path: Path) -> Registry:
        """Open (creating and migrating if needed) the database and load every record."""
        try:
            _prepare_file(path)
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise RegistryError(f"cannot open the client registry {path}: {e}") from None
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise RegistryError(
                    f"{path}: SQLite refused WAL mode (got {mode!r}); keep the state "
                    "directory on a local filesystem"
                )
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA busy_timeout = 5000")
            migrate(db, path)
            rows = db.execute(f"SELECT {_COLUMNS} FROM clients").fetchall()  # noqa: S608
        except sqlite3.DatabaseError as e:
            db.close()
            raise RegistryError(
                f"the client registry {path} is unreadable ({e}); restore it from a backup"
            ) from None
        except BaseException:
            db.close()
            raise
        records = {row[0]: _record(row) for row in rows}
        return cls(db, path, records)

    def close(self) -> None:
        """Write pending usage counts and close the database; later calls do nothing."""
        with self._lock:
            if self._db is None:
                return
            try:
                self._flush_locked()
            finally:
                self._db.close()
                self._db = None

    def issue(
        self,
        *,
        name: str,
        expires_at: int,
        issued_by: str,
        note: str | None = None,
        models: Sequence[str] | None = None,
        rpm: int | None = None,
        concurrency: int | None = None,
        tokens_per_day: int | None = None,
        now: int | None = None,
    ) -> ClientRecord:
        """Record a new client; its id is the jti to put in the secret."""
        now = _now(now)
        if not _NAME.fullmatch(name):
            raise RegistryError(f"invalid client name {_quote(name)}: {NAME_RULE}")
        if expires_at <= now:
            raise RegistryError("the expiry must lie in the future")
        for label, limit in (
            ("rpm", rpm),
            ("concurrency", concurrency),
            ("tokens_per_day", tokens_per_day),
        ):
            if limit is not None and (isinstance(limit, bool) or limit < 1):
                raise RegistryError(f"{label} must be a whole number of at least 1")
        if models is not None and not all(isinstance(m, str) and m for m in models):
            raise RegistryError("models must be a list of non-empty model names")
        record = ClientRecord(
            id=secrets.token_hex(16),
            name=name,
            created_at=now,
            expires_at=expires_at,
            issued_by=issued_by,
            note=note,
            models=tuple(models) if models is not None else None,
            rpm=rpm,
            concurrency=concurrency,
            tokens_per_day=tokens_per_day,
        )
        with self._lock:
            for other in self._records.values():
                if other.name == name and other.status(now) == "active":
                    raise DuplicateClient(
                        f"an active client named {name!r} exists (id {other.id}); revoke it "
                        "first or choose another name"
                    )
            models_json = json.dumps(list(record.models)) if record.models is not None else None
            self._write(
                f"INSERT INTO clients ({_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    name,
                    now,
                    expires_at,
                    issued_by,
                    note,
                    models_json,
                    rpm,
                    concurrency,
                    tokens_per_day,
                    None,
                    None,
                    None,
                    None,
                    0,
                ),
            )
            self._records[record.id] = record
        return record

    def get(self, jti: str) -> ClientRecord | None:
        """The record for a secret's jti; memory only, for the request path."""
        return self._records.get(jti)

    def find(self, name_or_id: str, now: int | None = None) -> ClientRecord:
        """By exact id; else by name, preferring the active client, else the newest."""
        now = _now(now)
        record = self._records.get(name_or_id)
        if record is not None:
            return record
        named = [r for r in self._records.values() if r.name == name_or_id]
        if not named:
            raise ClientNotFound(f"no client named or with id {_quote(name_or_id)}; {_LIST_HINT}")
        return max(named, key=lambda r: (r.status(now) == "active", r.created_at, r.id))

    def revoke(
        self,
        name_or_id: str,
        *,
        by: str,
        reason: str | None = None,
        now: int | None = None,
    ) -> ClientRecord:
        now = _now(now)
        with self._lock:
            record = self.find(name_or_id, now)
            if record.revoked_at is not None:
                raise AlreadyRevoked(
                    f"client {record.name!r} (id {record.id}) was already revoked by "
                    f"{record.revoked_by} at {_iso(record.revoked_at)}; {_LIST_HINT}"
                )
            self._write(
                "UPDATE clients SET revoked_at = ?, revoked_by = ?, revoke_reason = ? WHERE id = ?",
                (now, by, reason, record.id),
            )
            # Re-read under the lock: a touch may have replaced the record meanwhile.
            current = self._records[record.id]
            revoked = replace(current, revoked_at=now, revoked_by=by, revoke_reason=reason)
            self._records[record.id] = revoked
        return revoked

    def list(self, *, include_inactive: bool = False, now: int | None = None) -> list[ClientRecord]:
        now = _now(now)
        records = sorted(self._records.values(), key=lambda r: (r.created_at, r.id))
        if include_inactive:
            return records
        return [r for r in records if r.status(now) == "active"]

    def counts(self, now: int | None = None) -> dict[str, int]:
        now = _now(now)
        counts = {"active": 0, "expired": 0, "revoked": 0}
        for record in self._records.values():
            counts[record.status(now)] += 1
        return counts

    def touch(self, jti: str, now: int) -> None:
        """Count a served request: memory now, the database at the next flush."""
        with self._lock:
            record = self._records.get(jti)
            if record is None:
                return
            self._records[jti] = replace(
                record,
                requests=record.requests + 1,
                last_seen_at=max(now, record.last_seen_at or 0),
            )
            self._pending.add(jti)

    def flush(self) -> None:
        """Write the counters of every touched client in one transaction."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        # Memory holds the totals, so writing them (rather than increments) is idempotent.
        rows = [
            (self._records[jti].requests, self._records[jti].last_seen_at, jti)
            for jti in self._pending
        ]
        self._write_many("UPDATE clients SET requests = ?, last_seen_at = ? WHERE id = ?", rows)
        self._pending.clear()

    def _write(self, sql: str, params: Sequence[Any]) -> None:
        self._write_many(sql, [params])

    def _write_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run `sql` for each row in one committed transaction, or raise RegistryError."""
        if self._db is None:
            raise RegistryError("the client registry is closed")
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise RegistryError(
                f"cannot write the client registry {self._path}: {e}; check the disk "
                "space and the state directory's permissions"
            ) from None


def _prepare_file(path: Path) -> None:
    """Create the database file 0600 before SQLite does (SQLite copies its mode to -wal/-shm)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o777 != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        sidecar = path.with_name(path.name + suffix)
        if sidecar.exists() and sidecar.stat().st_mode & 0o777 != 0o600:
            os.chmod(sidecar, 0o600)


def _record(row: Sequence[Any]) -> ClientRecord:
    models = json.loads(row[6]) if row[6] is not None else None
    return ClientRecord(
        id=row[0],
        name=row[1],
        created_at=row[2],
        expires_at=row[3],
        issued_by=row[4],
        note=row[5],
        models=tuple(models) if models is not None else None,
        rpm=row[7],
        concurrency=row[8],
        tokens_per_day=row[9],
        revoked_at=row[10],
        revoked_by=row[11],
        revoke_reason=row[12],
        last_seen_at=row[13],
        requests=row[14],
    )


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


def _quote(text: str) -> str:
    # Nothing valid is longer than 64 characters; longer input may be a pasted secret,
    # which must not end up in an error message or the audit log.
    return repr(text) if len(text) <= 64 else "(a value too long to be a name or id)"


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
