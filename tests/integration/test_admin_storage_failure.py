"""A registry that cannot be written is a failed operation (exit 1), not a usage error (2).

Both tests use a real daemon, the real `vibectl-admin` process and a real SQLite
refusal. File modes cannot make the database read-only here: the tests may run as
root, and root writes a 0400 file in a 0500 directory regardless. So:

- read-only: the registry's connection is reopened on the same file with SQLite's
  ``mode=ro`` URI parameter, which opens the file O_RDONLY; SQLite then refuses every
  write with SQLITE_READONLY whoever the process runs as. This swaps the SQLite
  database's connection (a private attribute) because that is the only uid-independent
  way to get a read-only database under a running daemon.
- locked: a second connection, as a backup job or an operator's sqlite3 shell would,
  holds the database's write lock; the daemon waits out its busy timeout (5 s) and
  gets SQLITE_BUSY. Nothing of the daemon is touched.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import RunningDaemon
from tests.conftest import admin_cli as admin
from vibectld.store.registry import Registry
from vibectld.store.sqlite import SQLiteDatabase


def _registry_path(daemon: RunningDaemon) -> Path:
    return daemon.config.state_dir / "registry.db"


@contextmanager
def _read_only_registry(daemon: RunningDaemon) -> Iterator[None]:
    registry = daemon.runtime.registry
    assert isinstance(registry, Registry)
    db = registry._db
    assert isinstance(db, SQLiteDatabase)
    uri = f"file:{_registry_path(daemon)}?mode=ro"
    read_only = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
    with registry._db_lock:
        writable, db._conn = db._conn, read_only
    try:
        yield
    finally:
        with registry._db_lock:
            db._conn = writable
        read_only.close()


def _assert_nothing_issued(daemon: RunningDaemon) -> None:
    listed = admin(daemon, "--json", "list-clients", "--all")
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []


def test_issue_client_on_a_read_only_registry_fails_with_the_reason(
    daemon: RunningDaemon,
) -> None:
    with _read_only_registry(daemon):
        out = admin(daemon, "issue-client", "alice")
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert out.stdout == ""  # no URL: the secret was never recorded
    assert "cannot write the client registry" in out.stderr
    assert "readonly" in out.stderr  # SQLite's own reason, passed through
    _assert_nothing_issued(daemon)
    # Writable again: the daemon kept serving and the same name can be issued.
    assert admin(daemon, "issue-client", "alice").returncode == 0


def test_issue_client_on_a_locked_registry_fails_with_the_reason(daemon: RunningDaemon) -> None:
    holder = sqlite3.connect(_registry_path(daemon), isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the write lock, held until ROLLBACK
        out = admin(daemon, "issue-client", "bob")
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert "database is locked" in out.stderr
    _assert_nothing_issued(daemon)
