"""The PostgreSQL schema and its versions: MIGRATIONS (the tables, and the PL/pgSQL
functions the cluster limits call) and migrate(), which applies the missing ones.

The schema has its own version table, `vibectld_schema` (one row per version applied),
and is created and migrated in one transaction under a transaction-level advisory lock,
so nodes starting together on an empty database take turns: the first creates the
schema, the others find it. The tables are SQLite's (migrations.py), differing only in
types: BIGINT for counts and times, DOUBLE PRECISION for dollars (REAL is 4 bytes here),
an identity column for the audit id. The engine that connects and runs them is
postgresql.py.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

from vibectld.store.records import RegistryError

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
    # Version 3: a server.name is one running node's (service/node_name.py). Each run
    # writes a random instance id into its lease_holders row, with the host, pid and
    # machine it runs as; the tick refreshes only a row its own run holds, or one silent
    # past the lease timeout, and otherwise says who holds it, so two nodes given one
    # name cannot delete each other's leases. Version 2's tick is kept, and called for
    # the rest of the work, so nodes of the previous release still running during a
    # rolling upgrade keep ticking.
    (
        """
        ALTER TABLE lease_holders
            ADD COLUMN instance TEXT,  -- random per run of a node
            ADD COLUMN host TEXT,  -- for the operator: where that run is
            ADD COLUMN pid INTEGER,
            ADD COLUMN machine TEXT  -- boot id and pid namespace: where a pid is one process
        """,
        """
        CREATE FUNCTION vibectld_limits_tick(
            p_node TEXT, p_instance TEXT, p_host TEXT, p_pid INTEGER, p_machine TEXT,
            p_held TEXT[], p_grace DOUBLE PRECISION, p_timeout DOUBLE PRECISION,
            p_sweep BOOLEAN,
            OUT mine BOOLEAN, OUT holder_instance TEXT, OUT holder_host TEXT,
            OUT holder_pid INTEGER, OUT holder_machine TEXT,
            OUT holder_alive_at DOUBLE PRECISION, OUT holder_age DOUBLE PRECISION
        ) LANGUAGE plpgsql AS $$
        DECLARE
            t DOUBLE PRECISION := extract(epoch FROM clock_timestamp());
        BEGIN
            INSERT INTO lease_holders AS h (node, alive_at, instance, host, pid, machine)
                VALUES (p_node, t, p_instance, p_host, p_pid, p_machine)
                ON CONFLICT (node) DO UPDATE SET alive_at = excluded.alive_at,
                    instance = excluded.instance, host = excluded.host, pid = excluded.pid,
                    machine = excluded.machine
                WHERE h.instance = p_instance OR h.alive_at < t - p_timeout;
            mine := FOUND;
            IF NOT mine THEN
                SELECT h.instance, h.host, h.pid, h.machine, h.alive_at, t - h.alive_at
                    INTO holder_instance, holder_host, holder_pid, holder_machine,
                        holder_alive_at, holder_age
                    FROM lease_holders h WHERE h.node = p_node;
                RETURN;
            END IF;
            -- The row is this run's (and locked): version 2's tick does the rest, this
            -- node's leases no call holds and the sweep.
            PERFORM vibectld_limits_tick(p_node, p_held, p_grace, p_sweep);
        END
        $$
        """,
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: psycopg.Connection[tuple[Any, ...]], where: str) -> None:
    """Create the schema, or bring it up to SCHEMA_VERSION, in one transaction under the
    schema lock (RegistryError if the database's schema is newer than this vibectld's)."""
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
                f"{where} has schema version {version}, newer than this vibectld "
                f"knows ({SCHEMA_VERSION}); run the newer vibectld on every node"
            )
        for step in range(version, SCHEMA_VERSION):
            for sql in MIGRATIONS[step]:
                conn.execute(sql)
            conn.execute(
                "INSERT INTO vibectld_schema (version, migrated_at) VALUES (%s, %s)",
                (step + 1, int(time.time())),
            )
