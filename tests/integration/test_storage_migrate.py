"""`vibectl-admin storage migrate --to postgresql`: a single SQLite node's store, copied
into an empty PostgreSQL database (a real PostgreSQL 15, tests/postgres.py) through the
real vibectl-admin and the real daemon.

The database is then read directly, table by table, against the SQLite file and the key
files: every client, usage and redaction row and audit row; the signing keys and the CA
sealed with the cluster key (opened here with the same key and compared with the files),
and no private key in plaintext anywhere in the database. Then the node restarts on
PostgreSQL, and a second node with nothing in its state directory joins: the secrets
issued before the migration work on both, through the CA their URLs pinned.
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.conftest import RunningDaemon, _register_fake_models, admin_cli, short_tmpdir
from tests.postgres import Postgres
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.config_file import load_config
from vibectld.pki.key_files import KeyDirectory
from vibectld.pki.kids import kid_created_at
from vibectld.pki.sealed import CHECK_PLAINTEXT, ClusterKey
from vibectld.pki.tls import ca_fingerprint
from vibectld.store import transfer
from vibectld.store.postgresql import PostgreSQLDatabase
from vibectld.store.registry import Registry

# Start a daemon from `raw`, written as the config file in a directory (default: the
# test's etc/, whose keys/ holds the credentials): the daemon and the file.
Start = Callable[..., tuple[RunningDaemon, Path]]
# A JWT in a prompt: the server's redaction policy (redact, the default) counts it.
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
CLIENT_COLUMNS = (
    "id, name, created_at, expires_at, issued_by, note, models, rpm, concurrency, "
    "tokens_per_day, revoked_at, revoked_by, revoke_reason, last_seen_at, requests, "
    "updated_at, updated_by, kid, usd_per_month"
)
TABLES = {
    "clients": CLIENT_COLUMNS,
    "usage": "client_id, day, requests, errors, input_tokens, output_tokens, cost_usd",
    "redactions": "client_id, day, kind, count",
    "audit": "id, at, caller_uid, caller_user, op, target, outcome, detail",
}


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Start]:
    """Daemons configured from a file, as an operator runs them, so that keys/ beside
    the file holds the credentials; each one still running is stopped at the end."""
    _register_fake_models()
    started: list[RunningDaemon] = []

    def run(raw: dict[str, Any], etc: Path | None = None) -> tuple[RunningDaemon, Path]:
        path = (etc or tmp_path / "etc") / "config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        running = RunningDaemon(load_config(path)).start()
        started.append(running)
        return running, path

    yield run
    for running in reversed(started):
        if running.thread.is_alive():
            running.stop()


@pytest.fixture
def second_sock_dir() -> Iterator[Path]:
    """The second node's admin socket directory (a short path, as sock_dir)."""
    path = short_tmpdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


def single_node(tmp_path: Path, sock_dir: Path, name: str = "bastion") -> dict[str, Any]:
    """One node on SQLite."""
    return {
        "server": {"listen": "127.0.0.1:0", "name": name},
        "admin": {
            "socket": str(sock_dir / "admin.sock"),
            "group": grp.getgrgid(os.getgid()).gr_name,
        },
        "state_dir": str(tmp_path / name / "state"),
        "models": {"default": "echo"},
        "limits": {"requests_per_minute": None, "concurrent_requests": None},
        "logging": {"level": "warning", "format": "console"},
    }


def install(config_dir: Path, name: str, value: str) -> None:
    keys = config_dir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    (keys / name).write_text(value + "\n", encoding="utf-8")
    os.chmod(keys / name, 0o600)


def migrate(daemon: RunningDaemon, *extra: str) -> Any:
    return admin_cli(daemon, *extra, "storage", "migrate", "--to", "postgresql")


def call(daemon: RunningDaemon, secret: str, prompt: str = "hi", ca: bytes | None = None) -> str:
    """One Execute, trusting only `ca` (default: the daemon's CA file); its status."""
    creds = grpc.ssl_channel_credentials(ca or daemon.ca_pem)
    with grpc.secure_channel(f"localhost:{daemon.port}", creds) as channel:
        try:
            pb_grpc.VibectlLLMProxyStub(channel).Execute(
                pb.ExecuteRequest(user_fragments=[prompt]),
                metadata=[("authorization", f"Bearer {secret}")],
                timeout=30,
            )
        except grpc.RpcError as e:
            return str(e.code().name)
    return "OK"


def sqlite_rows(state: Path, table: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{state / 'registry.db'}?mode=ro", uri=True)) as db:
        return db.execute(f"SELECT {TABLES[table]} FROM {table} ORDER BY 1, 2").fetchall()  # noqa: S608


def pg_rows(conn: psycopg.Connection[Any], sql: str) -> list[tuple[Any, ...]]:
    return list(conn.execute(sql).fetchall())


def der(path: Path) -> bytes:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def test_a_single_node_store_is_copied_whole_and_only_once(
    postgres: Postgres,
    start: Start,
    tmp_path: Path,
    sock_dir: Path,
    second_sock_dir: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    raw = single_node(tmp_path, sock_dir)
    daemon, config_path = start(raw)
    state = daemon.config.state_dir
    # Three keys: the first signs "early" and is then retired, the second (rotated
    # away from, still verifying) signs alice and bob, the third (current) signs carol.
    early = daemon.issue("early")
    first = daemon.admin("list_signing_keys")["keys"][0]["kid"]
    second = daemon.admin("rotate_signing_key")["kid"]
    alice, bob = daemon.issue("alice", rpm=30), daemon.issue("bob")
    third = daemon.admin("rotate_signing_key")["kid"]
    carol = daemon.issue("carol", note="on call")
    assert call(daemon, alice) == "OK" and call(daemon, alice, f"token {JWT}") == "OK"
    assert call(daemon, bob) == "OK" and call(daemon, carol) == "OK"
    daemon.admin("revoke_client", {"target": "bob", "reason": "left"})
    daemon.admin("retire_signing_key", {"target": first})
    assert call(daemon, early) == "UNAUTHENTICATED" and call(daemon, bob) == "UNAUTHENTICATED"
    ca_pem = (state / "tls" / "ca.pem").read_text()

    # Without the credentials: exit 1, naming both files and how to make the key.
    failed = migrate(daemon)
    assert failed.returncode == 1 and failed.stdout == ""
    keys = config_path.parent.resolve() / "keys"
    assert "the postgresql-dsn credential is missing: put a libpq connection string" in (
        failed.stderr
    )
    assert str(keys / "postgresql-dsn") in failed.stderr
    assert str(keys / "cluster-key") in failed.stderr
    assert "vibectld --generate-cluster-key" in failed.stderr
    install(config_path.parent, "postgresql-dsn", postgres.dsn)
    only_key_missing = migrate(daemon)
    assert only_key_missing.returncode == 1
    assert "postgresql-dsn" not in only_key_missing.stderr.split("; put")[0]
    assert "the cluster-key credential is missing" in only_key_missing.stderr
    cluster_key, key_text = ClusterKey.generate()
    install(config_path.parent, "cluster-key", key_text)

    done = migrate(daemon)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"copied this node's store into the PostgreSQL database {postgres.dbname!r} on "
        f"127.0.0.1:{postgres.port}:",
        "  4 clients",
        f"  {len(sqlite_rows(state, 'usage'))} usage rows",
        "  1 redaction row",
        f"  {len(sqlite_rows(state, 'audit')) - 1} audit rows",
        "  2 signing keys (and 1 retired)",
        f"  the CA (ca-sha256 {ca_fingerprint(ca_pem.encode())}): the URLs already issued "
        "keep their pin",
    ]
    assert "set storage.backend: postgresql and server.public_url" in done.stderr
    assert 'vibectld(8), "Running several nodes"' in done.stderr

    with psycopg.connect(postgres.dsn) as conn:
        # The registry's tables, row for row.
        for table in ("clients", "usage", "redactions"):
            copied = pg_rows(conn, f"SELECT {TABLES[table]} FROM {table} ORDER BY 1, 2")  # noqa: S608
            assert copied == sqlite_rows(state, table), table
        # The audit trail, ids kept; the SQLite trail gained the migration's own row after
        # the copy, and the cluster's its own (with what was copied).
        audit = pg_rows(conn, f"SELECT {TABLES['audit']} FROM audit ORDER BY id")  # noqa: S608
        local = sqlite_rows(state, "audit")
        assert audit[:-1] == local[:-1]
        assert local[-1][4:7] == ("storage_migrate", "postgresql", "ok")
        assert audit[-1][0] == local[-1][0] and audit[-1][4:7] == local[-1][4:7]
        assert audit[-1][7] == (
            f"copied from SQLite: 4 clients, 3 usage rows, 1 redaction rows, "
            f"{len(audit) - 1} audit rows, 3 signing keys, the CA"
        )
        # The next row the cluster writes follows the copied ones.
        conn.execute(
            "INSERT INTO audit (at, caller_user, op, outcome) VALUES (0, 'test', 'probe', 'ok')"
        )
        assert pg_rows(conn, "SELECT MAX(id) FROM audit") == [(audit[-1][0] + 1,)]
        conn.rollback()

        # The signing keys, sealed: each opens with the cluster key to the file's key.
        rows = pg_rows(
            conn, "SELECT kid, sealed, created_at, retired_at FROM signing_keys ORDER BY kid"
        )
        assert [r[0] for r in rows] == [first, second, third]
        files = {
            first: state / "signing-keys" / "retired" / f"{first}.pem",
            second: state / "signing-keys" / f"{second}.pem",
            third: state / "signing-keys" / f"{third}.pem",
        }
        for kid, sealed, created_at, retired_at in rows:
            opened = cluster_key.open(sealed, f"signing_key {kid}")
            assert opened == der(files[kid])
            assert isinstance(serialization.load_der_private_key(opened, None), Ed25519PrivateKey)
            assert created_at == kid_created_at(kid)  # the time the kid carries
            assert (retired_at is not None) == (kid == first)
        # The CA: the same certificate (so the same pin), its key sealed; the check row.
        secrets = {
            r[0]: r[1:]
            for r in pg_rows(conn, "SELECT name, public_pem, sealed FROM cluster_secrets")
        }
        assert set(secrets) == {"ca", "check"}
        assert secrets["ca"][0] == ca_pem
        assert cluster_key.open(secrets["ca"][1], "ca") == der(state / "tls" / "ca.key")
        assert secrets["check"][0] is None
        assert cluster_key.open(secrets["check"][1], "check") == CHECK_PLAINTEXT

        # No private key in plaintext anywhere: every row of every table, as text.
        tables = [
            r[0]
            for r in pg_rows(conn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        dump = "\n".join(
            str(row)
            for t in tables
            for row in pg_rows(conn, f"SELECT t::text FROM {t} t")  # noqa: S608
        )
        assert "PRIVATE KEY" not in dump
        for path in [*files.values(), state / "tls" / "ca.key"]:
            assert der(path).hex() not in dump
            assert der(path)[-32:].hex() not in dump  # the raw private scalar

    # A second run finds the database in use and changes nothing.
    again = migrate(daemon)
    assert again.returncode == 1 and again.stdout == ""
    assert f"the PostgreSQL database {postgres.dbname!r}" in again.stderr
    assert "is not empty (it holds clients, usage, audit, signing_keys, cluster_secrets)" in (
        again.stderr
    )
    assert postgres.sql("SELECT COUNT(*) FROM clients") == "4"

    # The node still serves from SQLite, and its secrets work as before; what it counts
    # from now until its restart stays in SQLite (the command says so).
    usage = {r["name"]: r["requests"] for r in daemon.admin("usage")["usage"]}
    assert call(daemon, alice) == "OK" and call(daemon, carol) == "OK"

    # The next steps: the node restarts on PostgreSQL, with its files still there.
    daemon.stop()
    raw["storage"] = {"backend": "postgresql"}
    node, _ = start(raw)
    pin = ca_pem.encode()
    assert node.runtime.tls.ca_sha256 == ca_fingerprint(pin)
    assert [call(node, s, ca=pin) for s in (alice, carol, bob, early)] == [
        "OK",
        "OK",
        "UNAUTHENTICATED",  # revoked
        "UNAUTHENTICATED",  # signed by the retired key
    ]
    # Nothing to migrate any more.
    refused = migrate(node)
    assert refused.returncode == 1
    assert "already keeps its state in PostgreSQL: there is nothing to migrate" in refused.stderr
    kids = {(k["kid"], k["current"], k["retired"]) for k in node.admin("list_signing_keys")["keys"]}
    assert kids == {(first, False, True), (second, False, False), (third, True, False)}
    assert {r["name"]: r["requests"] for r in node.admin("usage")["usage"]} == {
        name: n + (name in ("alice", "carol")) for name, n in usage.items()
    }
    # New writes go on after the copied rows (the audit ids included).
    dave = node.issue("dave")
    ops = [(e["op"], e["outcome"]) for e in node.admin("audit")["entries"]]
    assert ops[-3:] == [
        ("storage_migrate", "ok"),  # the copy's own row
        ("storage_migrate", "failed"),  # the refusal above
        ("issue_client", "ok"),
    ]

    # A second node with an empty state directory and the same two credentials: the
    # CA and the keys come from the database, so the old URLs' pin verifies it too.
    other_etc = tmp_path / "node-2" / "etc"
    install(other_etc, "postgresql-dsn", postgres.dsn)
    install(other_etc, "cluster-key", key_text)
    second_raw = single_node(tmp_path, second_sock_dir, name="node-2")
    second_raw["storage"] = {"backend": "postgresql"}
    joined, _ = start(second_raw, other_etc)
    assert not (joined.config.state_dir / "tls" / "ca.pem").exists()
    assert [call(joined, s, ca=pin) for s in (alice, carol, dave, bob)] == [
        "OK",
        "OK",
        "OK",
        "UNAUTHENTICATED",
    ]
    out, err = capfd.readouterr()
    assert postgres.cluster.password not in out + err
    assert key_text.split(":", 1)[1] not in out + err


def test_json_result(postgres: Postgres, start: Start, tmp_path: Path, sock_dir: Path) -> None:
    daemon, config_path = start(single_node(tmp_path, sock_dir))
    daemon.issue("alice")
    install(config_path.parent, "postgresql-dsn", postgres.dsn)
    install(config_path.parent, "cluster-key", ClusterKey.generate()[1])
    done = migrate(daemon, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["target"] == "postgresql"
    assert (
        result["where"]
        == f"the PostgreSQL database {postgres.dbname!r} on 127.0.0.1:{postgres.port}"
    )
    assert result["copied"] == {
        "clients": 1,
        "usage": 0,
        "redactions": 0,
        "audit": 1,
        "signing_keys": 1,
        "retired_signing_keys": 0,
        "ca_sha256": daemon.runtime.tls.ca_sha256,
    }


def test_with_the_operator_s_certificate_there_is_no_ca_to_copy(
    postgres: Postgres,
    start: Start,
    start_daemon: Callable[..., RunningDaemon],
    tmp_path: Path,
    sock_dir: Path,
) -> None:
    # The operator's files: a certificate and key from a CA of theirs (here, one that a
    # throwaway self-managed daemon made).
    made = start_daemon(tmp_path / "made")
    made.stop()
    tls = tmp_path / "made" / "tls"
    raw = single_node(tmp_path, sock_dir)
    raw["server"]["tls"] = {
        "cert_file": str(tls / "server.pem"),
        "key_file": str(tls / "server.key"),
    }
    daemon, config_path = start(raw)
    daemon.issue("alice")
    install(config_path.parent, "postgresql-dsn", postgres.dsn)
    _, key_text = ClusterKey.generate()
    install(config_path.parent, "cluster-key", key_text)
    done = migrate(daemon)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == (
        "  no CA: server.tls.cert_file is set, so every node needs a certificate from one "
        "CA you run, with the load balancer's name"
    )
    assert postgres.sql("SELECT name FROM cluster_secrets") == "check"
    assert postgres.sql("SELECT COUNT(*) FROM clients") == "1"
    # No file of the self-managed CA was read: this node has none.
    assert not (daemon.config.state_dir / "tls" / "ca.key").exists()


def test_key_files_that_are_not_the_keys_in_use_are_refused(
    postgres: Postgres, start: Start, tmp_path: Path, sock_dir: Path
) -> None:
    daemon, config_path = start(single_node(tmp_path, sock_dir))
    install(config_path.parent, "postgresql-dsn", postgres.dsn)
    install(config_path.parent, "cluster-key", ClusterKey.generate()[1])
    # A key put in place by hand after the start: this node does not verify with it, so
    # copying it would make the cluster accept what this node refuses.
    keys = daemon.config.state_dir / "signing-keys"
    (keys / "20300101T000000Z-abcdef.pem").write_bytes(
        (keys / f"{daemon.runtime.signing.active_kid}.pem").read_bytes()
    )
    refused = migrate(daemon)
    assert refused.returncode == 1 and refused.stdout == ""
    assert "are not the keys this node uses" in refused.stderr
    assert "restart vibectld, then migrate" in refused.stderr
    assert postgres.sql("SELECT COUNT(*) FROM pg_tables WHERE tablename = 'clients'") == "0"


def test_tables_larger_than_a_page_are_copied_row_for_row(
    postgres: Postgres, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy reads each table in pages after the last key: with pages of 7 rows, keys
    whose order differs between cases and bytes, composite keys crossing page ends, and
    audit ids with gaps all arrive exactly."""
    monkeypatch.setattr(transfer, "ROWS_PER_PAGE", 7)
    state = tmp_path / "state"
    Registry.open(state / "registry.db").close()
    ids = [f"{prefix}{i:02d}" for prefix in ("a", "B", "é", "Z") for i in range(6)]
    with closing(sqlite3.connect(state / "registry.db")) as db, db:
        db.executemany(
            "INSERT INTO clients (id, name, created_at, expires_at, issued_by, models, "
            "usd_per_month) VALUES (?, ?, 1, 2, 'root (uid 0)', ?, ?)",
            [(i, f"n-{i}", '["echo"]' if n % 2 else None, n / 3) for n, i in enumerate(ids)],
        )
        days = ["2026-11-30", "2026-12-01", "2026-12-02"]
        db.executemany(
            "INSERT INTO usage VALUES (?, ?, ?, 0, ?, ?, ?)",
            [
                (i, d, n, n * 10, n * 20, n * 0.1)
                for n, (i, d) in enumerate((i, d) for i in ids for d in days)
            ],
        )
        db.executemany(
            "INSERT INTO redactions VALUES (?, ?, ?, 1)",
            [(i, days[0], kind) for i in ids[:9] for kind in ("jwt", "aws_key")],
        )
        db.executemany(
            "INSERT INTO audit (id, at, caller_uid, caller_user, op, outcome) "
            "VALUES (?, ?, 0, 'root', 'issue_client', 'ok')",
            [(n, n) for n in range(1, 60) if n % 5],  # ids with gaps, as after a restore
        )
    KeyDirectory(state / "signing-keys").load()
    registry = Registry.open(state / "registry.db")
    try:
        key = ClusterKey.generate()[0]
        files = transfer.read_cluster_files(state, key, serving_ca_sha256=None, self_managed=False)
        copied, _ = transfer.copy_to_postgresql(
            registry, postgres.dsn, files, transfer.Caller(0, "root")
        )
    finally:
        registry.close()
    assert (copied.clients, copied.usage, copied.redactions, copied.audit) == (24, 72, 18, 48)
    with psycopg.connect(postgres.dsn) as conn:
        for table in TABLES:
            order = "1, 2, 3" if table == "redactions" else "1, 2"
            rows = pg_rows(conn, f"SELECT {TABLES[table]} FROM {table} ORDER BY {order}")  # noqa: S608
            expected = sqlite_rows(state, table)
            if table == "audit":  # and the row saying what was copied
                assert rows[-1][4] == "storage_migrate"
                rows = rows[:-1]
            assert sorted(rows, key=repr) == sorted(expected, key=repr), table


def test_an_unreachable_database_copies_nothing_and_keeps_its_password(
    start: Start, tmp_path: Path, sock_dir: Path
) -> None:
    daemon, config_path = start(single_node(tmp_path, sock_dir))
    password = "hunter2-never-shown"
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dsn = f"host=127.0.0.1 port={port} dbname=cluster user=vibectld password={password}"
    install(config_path.parent, "postgresql-dsn", dsn)
    install(config_path.parent, "cluster-key", ClusterKey.generate()[1])
    failed = migrate(daemon)
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.startswith(
        "vibectl-admin: nothing was copied: cannot reach the client registry, the "
        f"PostgreSQL database 'cluster' on 127.0.0.1:{port}"
    )
    assert password not in failed.stderr
    # This node's own store is as healthy as before.
    assert daemon.admin("status")["storage"]["degraded"] is False


def test_a_copy_that_fails_midway_leaves_the_database_empty(
    postgres: Postgres, start: Start, tmp_path: Path, sock_dir: Path
) -> None:
    daemon, config_path = start(single_node(tmp_path, sock_dir))
    daemon.issue("alice")
    install(config_path.parent, "postgresql-dsn", postgres.dsn)
    install(config_path.parent, "cluster-key", ClusterKey.generate()[1])
    # The server refuses the signing keys, after the clients, usage and audit rows went
    # in: a real failure inside the copy's transaction (as a full disk would be).
    PostgreSQLDatabase.open(postgres.dsn).close()
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'no space left on device (test)'; END $$"
        )
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON signing_keys "
            "FOR EACH ROW EXECUTE FUNCTION refuse()"
        )
    failed = migrate(daemon)
    assert failed.returncode == 1 and failed.stdout == ""
    assert "the copy did not finish: " in failed.stderr
    assert "no space left on device (test)" in failed.stderr
    assert "run storage migrate again" in failed.stderr
    for table in ("clients", "usage", "audit", "signing_keys", "cluster_secrets"):
        assert postgres.sql(f"SELECT COUNT(*) FROM {table}") == "0", table  # noqa: S608
    # The failure was the target's: this node's own store is not marked degraded.
    assert daemon.admin("status")["storage"]["degraded"] is False
    postgres.sql("DROP TRIGGER refuse ON signing_keys")
    assert migrate(daemon).returncode == 0
    assert postgres.sql("SELECT COUNT(*) FROM clients") == "1"
