"""A throwaway PostgreSQL 15 cluster: initdb and pg_ctl in a temporary directory.

The tests (tests/postgres.py) and the benchmarks (bench/pg_drivers.py, the cluster
section) both start one; it lives here because nothing may import tests/.

The server runs as an unprivileged user: initdb and postgres refuse to run as root, and
CI runs as root, so there every command is run as `nobody` in a directory handed to it
(a normal user runs them as itself). It listens on 127.0.0.1 on a free port and on a
Unix socket in its own directory, never on 5432 or /var/run/postgresql, so it cannot
collide with a distribution's cluster. Clients authenticate with a password
(scram-sha-256), because the daemon reads a libpq connection string from a credential
file and the tests should exercise one that carries a password.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from bench.lifetime import ClosedOnExit

PG_BIN = Path(os.environ.get("VIBECTLD_PG_BIN", "/usr/lib/postgresql/15/bin"))
SUPERUSER = "postgres"
# A name CREATE DATABASE will take without quoting surprises; tests derive theirs from
# test names, which this turns into such a name.
_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class PostgresUnavailable(RuntimeError):
    """PostgreSQL's server binaries are not installed (scripts/system-deps installs them)."""


def unprivileged() -> dict[str, Any]:
    """subprocess keyword arguments that run a command as `nobody` when we are root.

    As a normal user they are empty: the command runs as that user.
    """
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


def private_dir(prefix: str) -> Path:
    """A new 0700 directory that the unprivileged user owns (see unprivileged()).

    As root it is made directly under /tmp, which `nobody` can traverse (a pytest
    tmp_path under /tmp/pytest-of-root is not), and short enough for a Unix socket path.
    """
    if os.geteuid() != 0:
        return Path(tempfile.mkdtemp(prefix=prefix))
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return path


def give_away(path: Path) -> None:
    """Hand a file we wrote to the unprivileged user, so its commands can read it."""
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(path, nobody.pw_uid, nobody.pw_gid)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at this moment."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def quote_dsn_value(value: str) -> str:
    """One value of a libpq keyword/value connection string, quoted as libpq parses it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PostgresCluster(ClosedOnExit):
    """One PostgreSQL server in its own directory. Use start_temporary() to get one.

    durable=False (the tests) turns fsync, synchronous commit and full-page writes off:
    each test creates a database, and a crash of the machine is not what they test.
    durable=True (the benchmarks) keeps PostgreSQL's defaults, as in production.
    """

    def __init__(self, root: Path, *, durable: bool) -> None:
        self.root = root
        self.data = root / "data"
        self.log_path = root / "postgres.log"
        self.durable = durable
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self._env = {
            "PATH": "/usr/bin:/bin",
            "HOME": str(root),
            "LC_ALL": "C",
            "TZ": "UTC",
        }

    # -- lifecycle -------------------------------------------------------------------

    @classmethod
    def start_temporary(cls, *, durable: bool = False) -> PostgresCluster:
        """initdb a new cluster in a fresh temporary directory and start it."""
        if not (PG_BIN / "initdb").exists():
            raise PostgresUnavailable(
                f"no PostgreSQL server in {PG_BIN}: run scripts/system-deps as root "
                "(or apt-get install postgresql-15)"
            )
        cluster = cls(private_dir("vibectld-pg-"), durable=durable)
        try:
            cluster._initdb()
            # A free port can be taken between our probe and postgres binding it; try
            # another rather than fail a whole test session over it.
            for attempt in range(3):
                cluster.port = free_port()
                cluster._write_settings()
                try:
                    cluster.start()
                    break
                except subprocess.CalledProcessError:
                    if attempt == 2 or "could not bind" not in cluster.log_tail():
                        raise
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        give_away(pwfile)
        self._run(
            PG_BIN / "initdb",
            "--pgdata", str(self.data),
            "--username", SUPERUSER,
            "--pwfile", str(pwfile),
            "--auth", "scram-sha-256",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-instructions",
            *([] if self.durable else ["--no-sync"]),
        )  # fmt: skip
        pwfile.unlink()

    def _write_settings(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.root}'",
            # Three daemons' pools, the tests' own connections and a benchmark's 2 x 16.
            "max_connections": "200",
            "logging_collector": "off",
            "log_min_messages": "warning",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        auto = self.data / "postgresql.auto.conf"
        auto.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        give_away(auto)

    def start(self) -> None:
        """Start the server (again) and wait until it accepts connections."""
        self._pg_ctl("start", "--log", str(self.log_path), "--timeout", "60")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` disconnects clients cleanly, `immediate` is a crash."""
        self._pg_ctl("stop", "--mode", mode, "--timeout", "60")

    def restart(self) -> None:
        """A fast restart: every connection is closed; the same port and data after it."""
        self._pg_ctl("restart", "--mode", "fast", "--log", str(self.log_path), "--timeout", "60")

    def running(self) -> bool:
        return self._postmaster_pid() is not None

    def close(self) -> None:
        """Stop the server if it runs and delete its directory; safe to call twice."""
        try:
            if self.running():
                try:
                    self.stop("fast")
                except subprocess.CalledProcessError:
                    self._kill_postmaster()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        pid = self._postmaster_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown of every backend
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._alive(pid):
                time.sleep(0.05)

    def _postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        return pid if self._alive(pid) else None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    # -- connection strings ----------------------------------------------------------

    def dsn_for(self, dbname: str = "postgres", *, unix_socket: bool = False) -> str:
        """A libpq keyword/value connection string, with the password, for one database."""
        host = str(self.root) if unix_socket else "127.0.0.1"
        parts = {
            "host": host,
            "port": str(self.port),
            "user": SUPERUSER,
            "password": self.password,
            "dbname": dbname,
        }
        return " ".join(f"{k}={quote_dsn_value(v)}" for k, v in parts.items())

    def url_for(self, dbname: str = "postgres") -> str:
        """The same over TCP as a postgresql:// URI (the form every driver accepts)."""
        return f"postgresql://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/{dbname}"

    @property
    def dsn(self) -> str:
        return self.dsn_for()

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name from template0 (empty, nothing inherited); its DSN."""
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        # FILE_COPY copies template0's files and checkpoints, about 30 ms with fsync off;
        # the default WAL_LOG writes the whole template through the WAL, 2-3 times slower.
        strategy = "WAL_LOG" if self.durable else "FILE_COPY"
        self.sql(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY {strategy}")
        return self.dsn_for(name)

    def drop_database(self, name: str) -> None:
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run one statement as the superuser over the Unix socket; rows as psql's
        unaligned output would show them (columns joined by |, one row a line)."""
        with psycopg.connect(self.dsn_for(dbname, unix_socket=True), autocommit=True) as conn:
            cur = conn.execute(statement.encode())
            if cur.description is None:
                return ""
            return "\n".join(
                "|".join("" if v is None else str(v) for v in row) for row in cur.fetchall()
            )

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # -- running commands as the cluster's owner ------------------------------------

    def _pg_ctl(self, *args: str) -> None:
        # -w: return once the server accepts connections (start) or is gone (stop).
        try:
            self._run(PG_BIN / "pg_ctl", "--pgdata", str(self.data), "-w", *args)
        except subprocess.CalledProcessError as e:
            raise subprocess.CalledProcessError(
                e.returncode, e.cmd, e.output, f"{e.stderr}\n-- postgres.log --\n{self.log_tail()}"
            ) from None

    def _run(self, *cmd: str | Path) -> None:
        # The server inherits no descriptor of ours, and pg_ctl's output is captured so
        # that a failure says why (a held port, a bad setting) instead of "exit 1".
        subprocess.run(
            [str(c) for c in cmd],
            env=self._env,
            cwd=self.root,
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
            **unprivileged(),
        )
