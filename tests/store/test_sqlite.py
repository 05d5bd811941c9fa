"""SQLite's own part of the store: the file (0600, WAL), user_version and its upgrades.

What every backend must do is the contract suite (test_contract.py, test_contract_usage.py),
which runs on SQLite too; this is what only the embedded file has.
"""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from vibectld.store.migrations import _migrate_v1
from vibectld.store.registry import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ClientRecord,
    Registry,
    RegistryError,
)

NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
DAY = 86400
ADMIN = "root(0)"
TODAY = "2027-01-15"
KID_A = "20260101T000000Z-aaaaaa"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "registry.db"


@pytest.fixture
def registry(db_path: Path) -> Iterator[Registry]:
    reg = Registry.open(db_path)
    yield reg
    reg.close()


def issue(reg: Registry, name: str = "alice", now: int = NOW, days: int = 90) -> ClientRecord:
    return reg.issue(name=name, expires_at=now + days * DAY, issued_by=ADMIN, now=now)


def test_wal_mode_schema_and_file_mode(db_path: Path, registry: Registry) -> None:
    issue(registry)
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(db_path.parent.stat().st_mode) == 0o700
    wal = db_path.with_name("registry.db-wal")
    assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[1] for r in con.execute("PRAGMA index_list(clients)")}
        assert "clients_name" in indexes
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"clients", "usage", "audit"} <= tables
        # Metadata only: no column could hold a secret.
        for table in ("clients", "usage", "audit"):
            columns = {r[1] for r in con.execute(f"PRAGMA table_info({table})")}
            assert not columns & {"token", "secret", "jwt"}
    finally:
        con.close()


def test_loose_file_mode_is_tightened(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch(mode=0o644)
    db_path.chmod(0o644)
    Registry.open(db_path).close()
    assert stat.S_IMODE(db_path.stat().st_mode) == 0o600


def test_newer_schema_is_refused(db_path: Path) -> None:
    Registry.open(db_path).close()
    con = sqlite3.connect(db_path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(RegistryError, match="newer than this vibectld"):
        Registry.open(db_path)


def test_garbage_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="restore it from a backup"):
        Registry.open(db_path)


def test_clients_of_an_older_schema_have_an_unknown_kid(db_path: Path) -> None:
    # A registry as the release before the kid column left it (schema version 2).
    db_path.parent.mkdir(parents=True)
    con = sqlite3.connect(db_path, isolation_level=None)
    for step in MIGRATIONS[:2]:
        step(con)
    con.execute(
        "INSERT INTO clients (id, name, created_at, expires_at, issued_by, requests) "
        "VALUES ('old0', 'legacy', ?, ?, ?, 3)",
        (NOW, NOW + DAY, ADMIN),
    )
    con.execute("PRAGMA user_version = 2")
    con.close()

    reg = Registry.open(db_path)
    legacy = reg.get("old0")
    assert legacy is not None and legacy.kid is None and legacy.requests == 3
    reg.issue(name="fresh", expires_at=NOW + DAY, issued_by=ADMIN, kid=KID_A, now=NOW)
    assert reg.active_by_kid(NOW) == {None: 1, KID_A: 1}
    reg.close()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
    finally:
        con.close()


def test_v1_database_is_migrated_in_place(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    con = sqlite3.connect(db_path, isolation_level=None)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("BEGIN IMMEDIATE")
    _migrate_v1(con)
    con.execute("PRAGMA user_version = 1")
    con.execute(
        "INSERT INTO clients (id, name, created_at, expires_at, issued_by, note, models, rpm, "
        "concurrency, tokens_per_day, revoked_at, revoked_by, revoke_reason, last_seen_at, "
        "requests) VALUES ('a1', 'alice', ?, ?, 'root(0)', 'old', '[\"m1\"]', 5, NULL, NULL, "
        "NULL, NULL, NULL, ?, 7)",
        (NOW - DAY, NOW + DAY, NOW - 60),
    )
    con.execute("COMMIT")
    con.close()

    reg = Registry.open(db_path, now=NOW)
    try:
        alice = reg.get("a1")
        assert alice == ClientRecord(
            id="a1",
            name="alice",
            created_at=NOW - DAY,
            expires_at=NOW + DAY,
            issued_by=ADMIN,
            note="old",
            models=("m1",),
            rpm=5,
            last_seen_at=NOW - 60,
            requests=7,
        )
        assert reg.tokens_used("a1", NOW) == 0
        reg.record_call(
            alice.id, now=NOW, error=False, input_tokens=10, output_tokens=20, cost_usd=None
        )
        reg.flush()
        assert reg.update("alice", by=ADMIN, rpm=9, now=NOW).rpm == 9
        reg.add_audit(
            at=NOW, caller_uid=0, caller_user="root", op="update", target="alice", outcome="ok"
        )
        assert [e.op for e in reg.audit(since=0)] == ["update"]
    finally:
        reg.close()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6
        assert con.execute("SELECT requests, rpm, updated_by FROM clients").fetchone() == (
            8,
            9,
            ADMIN,
        )
    finally:
        con.close()
    con = sqlite3.connect(db_path)
    try:
        assert con.execute(
            "SELECT client_id, day, requests, errors, input_tokens, output_tokens, cost_usd "
            "FROM usage"
        ).fetchall() == [("a1", TODAY, 1, 0, 10, 20, 0.0)]
    finally:
        con.close()
