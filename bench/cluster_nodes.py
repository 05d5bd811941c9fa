"""Several vibectld nodes on one PostgreSQL database, for the cluster section.

`BenchDatabase` is a temporary PostgreSQL 15 (bench/postgres.py, durable as in
production) with pg_stat_statements loaded, so the section can count the statements the
nodes send: each statement psycopg sends outside pipeline mode is one round trip.
`PgNode` is a `Vibectld` on `storage.backend: postgresql`, its connection string and
the cluster key installed as credentials in `keys/` beside its configuration, as an
operator would. Both are secrets (the connection string carries a password): they are
written to 0600 files only, never to the configuration, argv or a log line.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.clients import HOST
from bench.lifetime import ClosedOnExit
from bench.postgres import PostgresCluster, PostgresUnavailable
from bench.servers import BenchError, Processes, Vibectld, clean_env, tool
from vibectl.proxy_url import parse as parse_url
from vibectl.tls_pin import PinMismatch, pinned_ca

DATABASE = "vibectld_bench"
# The summary table's area for everything the cluster section measures on these nodes.
AREA = "Cluster (PostgreSQL)"


@dataclass
class Statements:
    """pg_stat_statements' counters, by statement: executions and milliseconds."""

    calls: Counter[str] = field(default_factory=Counter)
    ms: dict[str, float] = field(default_factory=dict)

    def __sub__(self, before: Statements) -> Statements:
        """What happened since `before` (statements that ran since, only)."""
        ran = {q for q, n in self.calls.items() if n > before.calls.get(q, 0)}
        return Statements(
            Counter({q: self.calls[q] - before.calls.get(q, 0) for q in ran}),
            {q: self.ms.get(q, 0.0) - before.ms.get(q, 0.0) for q in ran},
        )


class BenchDatabase(ClosedOnExit):
    """A temporary PostgreSQL with one database for the nodes and statement counting."""

    def __init__(self) -> None:
        self.cluster: PostgresCluster | None = None
        self.dsn = ""

    def start(self) -> None:
        try:
            self.cluster = PostgresCluster.start_temporary(durable=True)
        except PostgresUnavailable as e:
            raise BenchError(str(e)) from None
        except subprocess.CalledProcessError as e:
            raise BenchError(f"PostgreSQL did not start: {e.stderr[-500:]}") from None
        cluster = self.cluster
        # pg_stat_statements is in Debian's postgresql-15 but must be preloaded: the
        # setting takes a restart. Its defaults count what we want: top-level statements
        # only (a PL/pgSQL function's body is one call), BEGIN and COMMIT included.
        cluster.sql("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        cluster.restart()
        cluster.sql("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        self.dsn = cluster.create_database(DATABASE)

    def statements(self) -> Statements:
        """Executions so far of each statement (normalised text) in the nodes' database,
        and the server's time executing them.

        The counting queries run in the `postgres` database, so they are not counted.
        """
        assert self.cluster is not None
        rows = self.cluster.sql(  # a constant database name, not input
            "SELECT s.calls, s.total_exec_time, "  # noqa: S608
            "regexp_replace(s.query, '\\s+', ' ', 'g') "
            "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            f"WHERE d.datname = '{DATABASE}'"
        )
        got = Statements()
        for line in rows.splitlines():
            calls, ms, query = line.split("|", 2)
            if calls.isdigit():
                got.calls[query.strip()] += int(calls)
                got.ms[query.strip()] = got.ms.get(query.strip(), 0.0) + float(ms)
        return got

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text.strip() + "\n")


class PgNode(Vibectld):
    """A vibectld on `storage.backend: postgresql` whose server.name is its node name.

    A node of a cluster serves a certificate from the cluster's CA, which it keeps in
    memory, not in its state directory: the benchmark gets the CA as a client does, from
    the chain the node presents, picked by the issued URL's `ca-sha256` pin (`trust`).
    """

    # Vibectld's parameters spelled out rather than passed as **kwargs, so that mypy
    # checks every node's construction (a long signature: `duplicates` pairs it by shape
    # with others, such as fake_openai_http's _send; there is no logic to share).
    def __init__(
        self,
        procs: Processes,
        workdir: Path,
        sockdir: Path,
        *,
        name: str,
        dsn: str,
        cluster_key: str,
        models: dict[str, Any] | None = None,
        workers: int | None = None,
    ) -> None:
        super().__init__(procs, workdir, sockdir, name=name, models=models, workers=workers)
        self._dsn = dsn
        self._cluster_key = cluster_key

    def __repr__(self) -> str:
        return f"PgNode({self.name!r})"

    def start_first(self) -> str:
        """Start, issue the bench client, trust the CA its URL pins; that pin."""
        self.start(issue=False)
        url = parse_url(self.issue_url("bench"))
        if not url.secret or not url.ca_sha256:
            raise BenchError("the issued URL carries no secret or no ca-sha256 pin")
        self.secret = url.secret
        self.trust(url.ca_sha256)
        return url.ca_sha256

    def trust(self, pin: str) -> None:
        """Save the CA of the chain this node serves whose SHA-256 is `pin` (a node of
        another CA fails here: it would not serve the cluster's clients)."""
        try:
            pem = pinned_ca(HOST, self.port, pin)
        except (OSError, PinMismatch) as e:
            raise BenchError(
                f"{self.name}: no certificate matching the cluster's pin: {e}"
            ) from None
        self.ca_path.write_bytes(pem)

    @property
    def ca_path(self) -> Path:
        return self.workdir / "cluster-ca.pem"

    def write_config(self) -> None:
        super().write_config()
        config = yaml.safe_load(self.config_path.read_text())
        # Each node's heartbeat row is keyed by server.name.
        config["server"]["name"] = self.name
        config["storage"] = {"backend": "postgresql"}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        # Credentials beside the configuration (<config dir>/keys/<name>).
        _write_secret(self.workdir / "keys" / "postgresql-dsn", self._dsn)
        _write_secret(self.workdir / "keys" / "cluster-key", self._cluster_key)


def generate_cluster_key() -> str:
    """A new cluster key (`vibectld --generate-cluster-key`), the same file for every node."""
    out = subprocess.run(
        [tool("vibectld"), "--generate-cluster-key"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
        check=False,
    )
    key = out.stdout.strip()
    if out.returncode != 0 or not key:
        raise BenchError(f"vibectld --generate-cluster-key failed: {out.stderr.strip()[-300:]}")
    return key


# When a statement runs, relative to the call that caused it.
BEFORE_REPLY = "before the reply"  # the call waits for it
AFTER_REPLY = "after the reply"  # caused by calls, sent once the reply has gone
BATCHED = "batched or periodic"  # per flush or tick, not per call
UNKNOWN = "unclassified"


@dataclass(frozen=True)
class Purpose:
    label: str  # a few words, for one-line summaries
    why: str
    when: str


# What each statement the nodes send is for (from the daemon's code: store/, service/
# cluster_limits.py), by a pattern of its normalised text; the first match names it.
PURPOSES: tuple[tuple[str, Purpose], ...] = tuple(
    (pattern, Purpose(label, why, when))
    for pattern, label, why, when in (
        (r"vibectld_admit|rate_events", "limits",
         "cluster-wide rpm and concurrency in one function: count the call in the client's "
         "60 s window, then take a lease if its live leases leave room (under the client's "
         "advisory locks, by the database's clock; finished calls' leases ride along)",
         BEFORE_REPLY),
        (r"vibectld_limits_tick|lease_holders", "limiter tick",
         "limiter tick: this node alive, its stray leases dropped", BATCHED),
        (r"DELETE FROM leases", "leases released",
         "cluster-wide concurrency: finished calls' leases that no admit carried within a "
         "few ms, released in a batch of their own",
         AFTER_REPLY),
        (r"^(BEGIN|COMMIT|ROLLBACK)\b", "BEGIN/COMMIT",
         "transaction boundary of a batched write", BATCHED),
        (r"pg_notify|LISTEN|UNLISTEN", "feed notify/listen", "change feed: notify or listen",
         BATCHED),
        (r"\bchanges\b", "feed catch-up",
         "change feed: catch-up read (every 0.5 s, and on NOTIFY)", BATCHED),
        (r"pg_advisory", "advisory lock", "an advisory lock of a write", BATCHED),
        (r"\bnodes\b", "node heartbeat", "node heartbeat (status: nodes)", BATCHED),
        (r"usage_journals", "journal mark",
         "usage journal: the flush records the last segment it applied (no double count "
         "after a kill -9)", BATCHED),
        (r"INSERT INTO usage|UPDATE usage", "usage flush",
         "usage counters: flush, per client and day", BATCHED),
        (r"SUM\(cost_usd\)", "dollars re-read",
         "dollars spent (a client's month, the server's day): re-read for the budgets",
         BATCHED),
        (r"FROM usage WHERE day", "today's usage re-read",
         "today's cluster-wide usage, re-read after each flush", BATCHED),
        (r"INSERT INTO redactions", "redactions flush", "redaction counters: flush", BATCHED),
        (r"UPDATE clients SET .*(requests|last_seen)", "request counts flush",
         "request count and last seen: flush, per client", BATCHED),
        (r"FROM clients", "changed clients read",
         "client rows: the feed's read of changed clients", BATCHED),
        (r"synchronous_commit", "connection setup", "connection setup", BATCHED),
        (r"^SELECT \$?1$", "liveness check",
         "liveness check of a connection idle for a second", BATCHED),
    )
)  # fmt: skip


def purpose(statement: str) -> Purpose:
    for pattern, found in PURPOSES:
        if re.search(pattern, statement, re.IGNORECASE):
            return found
    return Purpose("unclassified", "-", UNKNOWN)
