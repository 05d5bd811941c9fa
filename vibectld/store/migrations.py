"""The registry's database file and its schema versions: creating the file 0600, and the
migrations that bring any older file up to this vibectld's schema.

vibectld.store.registry opens the file through here; the records it holds are in
vibectld.store.records.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from vibectld.store import audit, journal, usage
from vibectld.store.records import RegistryError


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


def _migrate_v2(db: sqlite3.Connection) -> None:
    for sql in usage.SCHEMA_V2 + audit.SCHEMA_V2:
        db.execute(sql)
    # Who changed a client's limits last; the audit table has the full history.
    db.execute("ALTER TABLE clients ADD COLUMN updated_at INTEGER")
    db.execute("ALTER TABLE clients ADD COLUMN updated_by TEXT")


def _migrate_v3(db: sqlite3.Connection) -> None:
    # The kid of the key that signed the client's secret, recorded at issue. NULL for
    # clients issued before: the registry never held the secret, so their key is unknown.
    db.execute("ALTER TABLE clients ADD COLUMN kid TEXT")


def _migrate_v4(db: sqlite3.Connection) -> None:
    # A client's own dollar budget per UTC month; NULL: the configured default applies.
    db.execute("ALTER TABLE clients ADD COLUMN usd_per_month REAL")


def _migrate_v5(db: sqlite3.Connection) -> None:
    # Secrets the server's redaction policy found in each client's prompts, per day and kind.
    for sql in usage.SCHEMA_V5:
        db.execute(sql)


def _migrate_v6(db: sqlite3.Connection) -> None:
    # Per usage journal, the highest segment the usage tables hold (journal.py), written
    # with each flush, so a journal replayed after a crash never counts a call twice.
    for sql in journal.SCHEMA_V6:
        db.execute(sql)


# MIGRATIONS[i] takes the schema from version i to i + 1. Append; never edit a shipped one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_v1,
    _migrate_v2,
    _migrate_v3,
    _migrate_v4,
    _migrate_v5,
    _migrate_v6,
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring the schema up to SCHEMA_VERSION, one transaction per step.

    Each step reads the version inside its own write transaction, so two processes
    opening the file at once take turns and the second finds the first's work done.
    """
    while True:
        db.execute("BEGIN IMMEDIATE")
        try:
            (version,) = db.execute("PRAGMA user_version").fetchone()
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"{path} has schema version {version}, newer than this vibectld knows "
                    f"({SCHEMA_VERSION}); run the newer vibectld, or restore a backup of the file"
                )
            if version < SCHEMA_VERSION:
                MIGRATIONS[version](db)
                # user_version is part of the database header, so it commits with the step.
                db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        if version >= SCHEMA_VERSION - 1:
            return


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
