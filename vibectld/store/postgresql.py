"""The PostgreSQL engine under the registry, for several nodes sharing one database.

The connection string is the operator's libpq string (the `postgresql-dsn` credential),
handed to libpq as it is; it is never logged and never part of an error message (the
target is named by host, port and database only). One connection, used by one thread at
a time (the Registry serialises it), in autocommit mode with explicit transactions; a
connection that breaks is dropped and the next operation connects again.

Durability as with SQLite: a transaction returns only once the server has committed it,
and a session whose database says `synchronous_commit = off` turns it back on.

The schema has its own version table, `vibectld_schema` (one row per version applied),
and is created and migrated in one transaction under a transaction-level advisory lock,
so nodes starting together on an empty database take turns: the first creates the
schema, the others find it. SQL is shared with SQLite (`?` placeholders, translated
here); the tables differ only in types: BIGINT for counts and times, DOUBLE PRECISION for
dollars (REAL is 4 bytes here), an identity column for the audit id.
"""

from __future__ import annotations

import contextlib
import functools
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from vibectld.store.base import Transaction
from vibectld.store.records import RegistryError, StorageFailure

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 5  # unless the connection string says otherwise
# A connection unused for longer is checked with a round trip before a write uses it.
IDLE_CHECK_SECONDS = 1.0
# pg_advisory_xact_lock's key for schema changes: "vibectld" in ASCII, as a bigint.
SCHEMA_LOCK = int.from_bytes(b"vibectld", "big")

# MIGRATIONS[i] takes the schema from version i to i + 1, in the transaction that records
# it in vibectld_schema. Append; never edit a shipped one. Version 1 holds what SQLite's
# versions 1 to 5 built, plus the nodes' heartbeats, restated in PostgreSQL's types (the
# shipped SQLite migrations, which it mirrors line for line, are never edited either).
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """
        CREATE TABLE clients (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            issued_by TEXT NOT NULL,
            note TEXT,
            models TEXT,  -- a JSON list of model names, or NULL for the server's list
            rpm BIGINT,
            concurrency BIGINT,
            tokens_per_day BIGINT,
            revoked_at BIGINT,
            revoked_by TEXT,
            revoke_reason TEXT,
            last_seen_at BIGINT,
            requests BIGINT NOT NULL DEFAULT 0,
            updated_at BIGINT,
            updated_by TEXT,
            kid TEXT,
            usd_per_month DOUBLE PRECISION
        )
        """,
        "CREATE INDEX clients_name ON clients (name)",
        """
        CREATE TABLE usage (
            client_id TEXT NOT NULL,
            day TEXT NOT NULL,  -- the UTC day, YYYY-MM-DD, as in SQLite
            requests BIGINT NOT NULL DEFAULT 0,
            errors BIGINT NOT NULL DEFAULT 0,
            input_tokens BIGINT NOT NULL DEFAULT 0,
            output_tokens BIGINT NOT NULL DEFAULT 0,
            cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
            PRIMARY KEY (client_id, day)
        )
        """,
        "CREATE INDEX usage_day ON usage (day)",
        """
        CREATE TABLE redactions (
            client_id TEXT NOT NULL,
            day TEXT NOT NULL,
            kind TEXT NOT NULL,
            count BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (client_id, day, kind)
        )
        """,
        "CREATE INDEX redactions_day ON redactions (day)",
        """
        CREATE TABLE audit (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at BIGINT NOT NULL,
            caller_uid BIGINT,
            caller_user TEXT NOT NULL,
            op TEXT NOT NULL,
            target TEXT,
            outcome TEXT NOT NULL,
            detail TEXT
        )
        """,
        "CREATE INDEX audit_at ON audit (at)",
        """
        CREATE TABLE nodes (
            name TEXT PRIMARY KEY,  -- server.name
            address TEXT NOT NULL,
            version TEXT NOT NULL,
            in_flight BIGINT NOT NULL,
            started_at BIGINT NOT NULL,
            heartbeat_at BIGINT NOT NULL
        )
        """,
    ),
    # Version 2: what several nodes share beyond the registry. The change feed (the
    # ids are taken under the "vibectld changes" advisory lock, held to commit, so id
    # order is commit order and a catch-up read by id never skips a late commit); the
    # cluster's CA and signing keys, their private halves sealed with the cluster key
    # (pki/sealed.py), never stored in plaintext; and the cluster-wide limits: the rpm
    # window's events and the concurrency leases, each lease owned by a node so that a
    # dead node's leases stop counting once its heartbeat is old.
    (
        """
        CREATE TABLE changes (
            id BIGSERIAL PRIMARY KEY,
            at BIGINT NOT NULL,
            kind TEXT NOT NULL,  -- 'client' (key: its id) | 'signing_key' (key: the kid)
            key TEXT NOT NULL
        )
        """,
        """
        CREATE TABLE cluster_secrets (
            name TEXT PRIMARY KEY,  -- 'ca', 'check'
            public_pem TEXT,  -- the certificate, for 'ca'
            sealed BYTEA NOT NULL,  -- the private part, sealed with the cluster key
            created_at BIGINT NOT NULL
        )
        """,
        """
        CREATE TABLE signing_keys (
            kid TEXT PRIMARY KEY,
            sealed BYTEA NOT NULL,  -- the Ed25519 private key (PKCS#8 DER), sealed
            created_at BIGINT NOT NULL,
            retired_at BIGINT
        )
        """,
        """
        CREATE TABLE rate_events (
            client_id TEXT NOT NULL,
            at DOUBLE PRECISION NOT NULL  -- the database's clock, unix seconds
        )
        """,
        "CREATE INDEX rate_events_client ON rate_events (client_id, at)",
        """
        CREATE TABLE leases (
            id TEXT PRIMARY KEY,
            client_id TEXT NOT NULL,
            node TEXT NOT NULL,  -- server.name of the node running the call
            started_at DOUBLE PRECISION NOT NULL
        )
        """,
        "CREATE INDEX leases_client ON leases (client_id)",
        # Which nodes' leases count: each node's limiter marks itself alive every 2 s by
        # the database's clock (not the node's, and not the registry's heartbeat, which a
        # slow usage write can delay); leases of a node silent for longer than the
        # caller's timeout do not count, so a killed node's slots come back.
        """
        CREATE TABLE lease_holders (
            node TEXT PRIMARY KEY,
            alive_at DOUBLE PRECISION NOT NULL  -- the database's clock, unix seconds
        )
        """,
        # How many of a client's rate events are in its window, kept beside them so that
        # a check costs the same at rpm 10 as at rpm 100,000 (counting the events, or
        # finding the rpm-th newest, would read every event of the window).
        """
        CREATE TABLE rate_counts (
            client_id TEXT PRIMARY KEY,
            n INTEGER NOT NULL
        )
        """,
        # One call's limits, in one round trip (service/cluster_limits.py): its rpm step,
        # then its concurrency slot, each when asked for (p_rpm, p_lease not NULL). Each
        # under the client's advisory lock (rpm's, then the lease's: always in that
        # order), so two nodes counting the same client take turns, and by the
        # database's clock, so the 60 s window is exact whatever the nodes' clocks say.
        # retry_ms > 0: the rpm step refused (nothing taken, not counted), room in that
        # many ms; else running >= 0: the slot refused, that many run (the rpm step
        # counted the call); else admitted. Only the events leaving the window are read,
        # and when refusing, the few oldest ones. The leases of nodes silent for
        # p_timeout do not count. `p_release`: leases this node's finished calls gave
        # back, carried along to save their own round trip (deleted before any lock).
        """
        CREATE FUNCTION vibectld_admit(
            p_client TEXT, p_rpm INTEGER, p_lease TEXT, p_node TEXT, p_limit INTEGER,
            p_timeout DOUBLE PRECISION, p_release TEXT[],
            OUT retry_ms INTEGER, OUT running INTEGER
        ) LANGUAGE plpgsql AS $$
        DECLARE
            t DOUBLE PRECISION;
            gone INTEGER;
            counted INTEGER;
            nth DOUBLE PRECISION;
        BEGIN
            retry_ms := 0;
            running := -1;
            IF cardinality(p_release) > 0 THEN
                DELETE FROM leases WHERE id = ANY (p_release);
            END IF;
            IF p_rpm IS NOT NULL THEN
                PERFORM pg_advisory_xact_lock(hashtextextended('vibectld rpm ' || p_client, 0));
                t := extract(epoch FROM clock_timestamp());
                DELETE FROM rate_events WHERE client_id = p_client AND at <= t - 60;
                GET DIAGNOSTICS gone = ROW_COUNT;
                SELECT c.n - gone INTO counted FROM rate_counts c WHERE c.client_id = p_client;
                counted := coalesce(counted, 0);
                IF counted >= p_rpm THEN
                    -- The rpm-th newest event: when it leaves the window, there is room.
                    SELECT e.at INTO nth FROM rate_events e WHERE e.client_id = p_client
                        ORDER BY e.at OFFSET counted - greatest(p_rpm, 1) LIMIT 1;
                    IF gone > 0 THEN
                        UPDATE rate_counts c SET n = counted WHERE c.client_id = p_client;
                    END IF;
                    retry_ms := greatest(1, floor((nth + 60 - t) * 1000))::INTEGER;
                    RETURN;
                END IF;
                INSERT INTO rate_events (client_id, at) VALUES (p_client, t);
                INSERT INTO rate_counts AS c (client_id, n) VALUES (p_client, counted + 1)
                    ON CONFLICT (client_id) DO UPDATE SET n = excluded.n;
            END IF;
            IF p_lease IS NOT NULL THEN
                PERFORM pg_advisory_xact_lock(
                    hashtextextended('vibectld lease ' || p_client, 0)
                );
                t := extract(epoch FROM clock_timestamp());
                SELECT count(*) INTO counted FROM leases l
                    JOIN lease_holders h ON h.node = l.node
                    WHERE l.client_id = p_client AND h.alive_at > t - p_timeout;
                IF counted >= p_limit THEN
                    running := counted;
                    RETURN;
                END IF;
                INSERT INTO leases (id, client_id, node, started_at)
                    VALUES (p_lease, p_client, p_node, t);
            END IF;
        END
        $$
        """,
        # A node's limiter, every 2 s: mark itself alive, and drop its leases that are no
        # longer held (a release that never arrived), except ones taken in the last
        # seconds, which a call may hold that `p_held` was read before. With `p_sweep`,
        # also what nobody else will delete: the events and counts of clients whose
        # window is empty, and the leases of nodes silent for an hour.
        """
        CREATE FUNCTION vibectld_limits_tick(
            p_node TEXT, p_held TEXT[], p_grace DOUBLE PRECISION, p_sweep BOOLEAN
        ) RETURNS VOID LANGUAGE plpgsql AS $$
        DECLARE
            t DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
            client TEXT;
        BEGIN
            INSERT INTO lease_holders (node, alive_at) VALUES (p_node, t)
                ON CONFLICT (node) DO UPDATE SET alive_at = excluded.alive_at;
            DELETE FROM leases WHERE node = p_node AND started_at < t - p_grace
                AND NOT (id = ANY (p_held));
            IF p_sweep THEN
                -- Clients whose window emptied: their last events and their count, each
                -- under the client's lock to the commit (skipped if busy), so that a
                -- count stays exact; a few hundred at a time, each lock a slot of the
                -- server's lock table.
                FOR client IN SELECT c.client_id FROM rate_counts c WHERE NOT EXISTS (
                    SELECT 1 FROM rate_events e WHERE e.client_id = c.client_id AND e.at > t - 60
                ) LIMIT 200 LOOP
                    IF pg_try_advisory_xact_lock(hashtextextended('vibectld rpm ' || client, 0))
                    THEN
                        -- Again under the lock: a call may have been counted since.
                        DELETE FROM rate_counts c WHERE c.client_id = client AND NOT EXISTS (
                            SELECT 1 FROM rate_events e
                            WHERE e.client_id = client AND e.at > t - 60
                        );
                        IF FOUND THEN
                            DELETE FROM rate_events e WHERE e.client_id = client;
                        END IF;
                    END IF;
                END LOOP;
                DELETE FROM leases WHERE node IN
                    (SELECT node FROM lease_holders WHERE alive_at < t - 3600);
                DELETE FROM lease_holders WHERE alive_at < t - 3600;
            END IF;
        END
        $$
        """,
        # Per usage journal (store/journal.py), the highest segment the usage tables
        # hold, written with each flush: a journal replayed after a crash never counts
        # a call twice. SQLite's version 6.
        """
        CREATE TABLE usage_journals (
            journal TEXT PRIMARY KEY,
            applied BIGINT NOT NULL,
            at BIGINT NOT NULL
        )
        """,
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


@functools.lru_cache(maxsize=256)
def translate(sql: str) -> str:
    """The statement with `?` placeholders as psycopg's `%s` (and a literal % doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


Connection = psycopg.Connection[tuple[Any, ...]]


class _PostgreSQLTransaction:
    def __init__(self, cursor: psycopg.Cursor[tuple[Any, ...]]) -> None:
        self._cursor = cursor

    def select(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._cursor.execute(translate(sql), params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._cursor.execute(translate(sql), params).rowcount

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._cursor.executemany(translate(sql), rows)

    def lock(self, key: str) -> None:
        self._cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


class PostgreSQLDatabase:
    backend = "postgresql"
    shared = True  # every node writes it

    def __init__(self, conninfo: str, where: str, password: str | None) -> None:
        self._conninfo = conninfo
        self.where = where  # "the PostgreSQL database NAME on HOST:PORT", no secrets
        self._password = password
        self._conn: Connection | None = None
        self._closed = False
        self._used_at = 0.0  # time.monotonic() of the connection's last successful use

    def __repr__(self) -> str:
        return f"PostgreSQLDatabase({self.where!r})"

    @property
    def conninfo(self) -> str:
        """The libpq string (a secret: it may hold a password), for the other
        connections a node opens to the same database (notifications, limits)."""
        return self._conninfo

    def clean(self, error: psycopg.Error) -> str:
        """A driver error as one line for a message, with the password taken out."""
        return self._clean(error)

    @classmethod
    def open(cls, dsn: str) -> PostgreSQLDatabase:
        """Connect with the libpq string `dsn` and create or migrate the schema."""
        try:
            params = conninfo_to_dict(dsn)
        except psycopg.Error:
            # libpq's message may quote part of the string, which may hold a password.
            raise StorageFailure(
                "the postgresql-dsn credential is not a libpq connection string "
                "(host=... dbname=... user=... or postgresql://...); fix the file"
            ) from None
        extra: dict[str, str | int] = {
            "application_name": "vibectld",
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        }
        conninfo = make_conninfo(dsn, **{k: v for k, v in extra.items() if k not in params})
        password = params.get("password")
        db = cls(conninfo, _describe(params), str(password) if password else None)
        try:
            db._run(db._migrate, "create the schema in")
        except BaseException:
            db.close()
            raise
        return db

    def transaction(self, work: Callable[[Transaction], T]) -> T:
        def run(conn: Connection) -> T:
            # Explicit statements rather than conn.transaction(), so that a break before
            # COMMIT (safe to run again) is told apart from one during it (not safe).
            with _before_commit(conn):
                conn.execute("BEGIN")
                try:
                    with conn.cursor() as cursor:
                        result = work(_PostgreSQLTransaction(cursor))
                except BaseException:
                    if not conn.broken:
                        conn.execute("ROLLBACK")
                    raise
            conn.execute("COMMIT")
            return result

        return self._run(run, "write")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        def run(conn: Connection) -> list[tuple[Any, ...]]:
            with _before_commit(conn):  # a read has nothing to commit
                return conn.execute(translate(sql), params).fetchall()

        return self._run(run, "read")

    def close(self) -> None:
        self._closed = True
        self._drop()

    # -- the connection -----------------------------------------------------------------

    def _run(self, work: Callable[[Connection], T], verb: str) -> T:
        """`work` on the connection; once more on a new one if the first broke before
        anything was committed (a restarted server), else StorageFailure."""
        for attempt in (1, 2):
            if self._closed:
                raise StorageFailure("the client registry is closed")
            conn = self._connection()
            try:
                return work(conn)
            except _NotCommitted as e:
                self._drop()
                error: psycopg.Error = e.error
                if attempt == 1:
                    continue
            except psycopg.Error as e:
                if conn.broken or isinstance(e, psycopg.OperationalError):
                    self._drop()  # the next operation connects again
                error = e
            break
        raise StorageFailure(
            f"cannot {verb} the client registry, {self.where}: {self._clean(error)}"
        ) from None

    def _connection(self) -> Connection:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            if time.monotonic() - self._used_at < IDLE_CHECK_SECONDS:
                self._used_at = time.monotonic()
                return conn
            # Idle for a while: the server may have restarted since. A failed write cannot
            # be retried safely (was it committed?), but a failed ping can.
            try:
                conn.execute("SELECT 1")
                self._used_at = time.monotonic()
                return conn
            except psycopg.Error:
                pass
        self._drop()
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as e:
            raise StorageFailure(
                f"cannot reach the client registry, {self.where}: {self._clean(e)}; check "
                "that PostgreSQL is running and reachable, and the postgresql-dsn credential"
            ) from None
        try:
            # Durable before acknowledged, whatever the database's default says.
            if conn.execute("SHOW synchronous_commit").fetchone() == ("off",):
                conn.execute("SET synchronous_commit = on")
        except psycopg.Error as e:
            conn.close()
            raise StorageFailure(f"cannot use {self.where}: {self._clean(e)}") from None
        self._conn = conn
        self._used_at = time.monotonic()
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):  # already gone
                conn.close()

    def _clean(self, error: psycopg.Error) -> str:
        """The driver's message on one line, with the password (if any) taken out."""
        text = " ".join(str(error).split()) or type(error).__name__
        if self._password:
            text = text.replace(self._password, "[redacted]")
        return text

    def _migrate(self, conn: Connection) -> None:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS vibectld_schema ("
                "version INTEGER PRIMARY KEY, migrated_at BIGINT NOT NULL)"
            )
            row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM vibectld_schema").fetchone()
            version = int(row[0]) if row else 0
            if version > SCHEMA_VERSION:
                raise RegistryError(
                    f"{self.where} has schema version {version}, newer than this vibectld "
                    f"knows ({SCHEMA_VERSION}); run the newer vibectld on every node"
                )
            for step in range(version, SCHEMA_VERSION):
                for sql in MIGRATIONS[step]:
                    conn.execute(sql)
                conn.execute(
                    "INSERT INTO vibectld_schema (version, migrated_at) VALUES (%s, %s)",
                    (step + 1, int(time.time())),
                )


class _NotCommitted(Exception):
    """The connection broke before COMMIT was sent: nothing was written, so the work may
    run again on a new connection. (A break during COMMIT is not this: it may have
    committed, and running it again could count usage twice.)"""

    def __init__(self, error: psycopg.Error) -> None:
        super().__init__(str(error))
        self.error = error


@contextlib.contextmanager
def _before_commit(conn: Connection) -> Iterator[None]:
    try:
        yield
    except psycopg.OperationalError as e:
        if conn.broken:
            raise _NotCommitted(e) from None
        raise


def _describe(params: dict[str, Any]) -> str:
    """The target of a connection string, for messages: never its password."""
    if params.get("service"):
        return f"the PostgreSQL service {params['service']!r}"
    dbname = params.get("dbname") or params.get("user") or "(the default database)"
    host = str(params.get("host") or params.get("hostaddr") or "the local socket")
    port = params.get("port")
    where = f"{host}:{port}" if port and not re.search(r"[,/]", host) else host
    return f"the PostgreSQL database {dbname!r} on {where}"
