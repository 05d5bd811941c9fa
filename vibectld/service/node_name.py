"""One running node per `server.name` on a shared database (storage.backend: postgresql).

The cluster limiter (cluster_limits.py) files each call's concurrency lease under its
node's name, and each node deletes the leases filed under its name that no call of its
own holds. Two nodes given the same name would therefore delete each other's leases,
and `status` would list one node: limits would silently stop being exact. So a starting
node claims its name in `lease_holders`, and refuses to start while a live node holds it.

Telling "another live node" from "my own previous run" (a crash, a kill -9, a reboot),
which left its row behind:

- Every run takes a random instance id and writes it into the row, with the host, pid
  and machine (boot id and pid namespace) it runs as. The limiter's tick refreshes the
  row's `alive_at` every TICK_SECONDS, by the database's clock, and only while the row
  still carries its own instance id (store/postgresql.py, `vibectld_limits_tick`).
- A row not refreshed for LEASE_TIMEOUT is free: that node is dead or cut off, and its
  leases have already stopped counting; taking the name over changes no count.
- A row written on this machine, in this pid namespace, by a pid that no longer runs
  is this machine's previous run: free at once, so a restart after a crash does not wait.
  The pid alone would not do: pids are per namespace (two containers both run pid 1)
  and are reused. A reused pid only costs the wait below, never a wrong take-over.
- Otherwise the row is watched: if its `alive_at` moves, a live node ticks under this
  name and the start is refused with NameInUse; if it stays still until LEASE_TIMEOUT,
  the name is free. A restart thus waits at most LEASE_TIMEOUT (6 s), and only when it
  cannot prove the row is its previous run's; a live node ticks every 2 s, so a
  refusal comes within about that.

The check and the claim are one transaction under an advisory lock on the name, with
the row locked, so two nodes starting together under one name cannot both claim it,
and a tick racing the claim sees the row's new owner.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import structlog

log = structlog.get_logger("vibectld.limits")

# How often a starting node looks at a row it is watching.
POLL_SECONDS = 0.25

_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('vibectld node ' || %s, 0))"
_ROW_SQL = (
    "SELECT instance, host, pid, machine, alive_at, "
    "extract(epoch FROM clock_timestamp()) - alive_at "
    "FROM lease_holders WHERE node = %s FOR UPDATE"
)
# The previous run's leases go with its row: it holds no call any more.
_CLAIM_SQL = (
    "WITH earlier AS (DELETE FROM leases WHERE node = %(node)s) "
    "INSERT INTO lease_holders (node, alive_at, instance, host, pid, machine) VALUES "
    "(%(node)s, extract(epoch FROM clock_timestamp()), %(instance)s, %(host)s, %(pid)s, "
    "%(machine)s) "
    "ON CONFLICT (node) DO UPDATE SET alive_at = excluded.alive_at, "
    "instance = excluded.instance, host = excluded.host, pid = excluded.pid, "
    "machine = excluded.machine"
)


class NameInUse(Exception):
    """Another live node holds this node's server.name; the message says what to do."""


def _machine() -> str | None:
    """This boot of this machine and this pid namespace: where a pid means one process.
    None where /proc does not say (then a row is never taken for our previous run's)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot} {namespace}"


@dataclass(frozen=True)
class Identity:
    """This run of this node, as its lease_holders row records it."""

    instance: str  # random per run
    host: str  # shown to the operator
    pid: int
    machine: str | None

    @classmethod
    def of_this_process(cls) -> Identity:
        return cls(uuid.uuid4().hex, socket.gethostname(), os.getpid(), _machine())

    def params(self, node: str) -> dict[str, object]:
        return {
            "node": node,
            "instance": self.instance,
            "host": self.host,
            "pid": self.pid,
            "machine": self.machine,
        }


@dataclass(frozen=True)
class Holder:
    """The node that holds a name, as its row described it when read."""

    instance: str | None
    host: str | None
    pid: int | None
    machine: str | None
    alive_at: float  # the database's clock
    age: float  # seconds since alive_at, by the same clock

    def describe(self) -> str:
        """'last seen 2 s ago, pid 1234 on bastion-2' (what is known of it)."""
        seen = f"last seen {max(0.0, self.age):.0f} s ago"
        if self.pid is not None and self.host:
            return f"{seen}, pid {self.pid} on {self.host}"
        return seen


def in_use_message(node: str, holder: Holder) -> str:
    return (
        f"server.name {node!r} is already in use by a live node ({holder.describe()}); "
        "give each node its own server.name in its configuration file"
    )


def _ran_here_and_ended(holder: Holder, me: Identity) -> bool:
    """Whether the row is this machine's previous run, which no longer runs."""
    if me.machine is None or holder.machine != me.machine or holder.pid is None:
        return False
    if holder.pid == me.pid:
        return True  # one pid namespace: no other process has ours
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # it runs, as another user
    return False  # it runs (perhaps a reused pid: then the watch decides)


def claim(
    conninfo: str,
    node: str,
    me: Identity,
    timeout: float,
) -> float:
    """Claim `node` for this run, deleting its previous run's leases; the seconds it
    waited. NameInUse if a live node holds it; psycopg.Error if the database fails."""
    started = time.monotonic()
    watched: Holder | None = None
    with psycopg.connect(conninfo, autocommit=True) as conn:
        while True:
            with conn.transaction():
                conn.execute(_LOCK_SQL, (node,))
                row = conn.execute(_ROW_SQL, (node,)).fetchone()
                holder = None if row is None else Holder(*row)
                if holder is None or holder.instance == me.instance:
                    free = True
                elif watched is not None and (
                    holder.instance != watched.instance or holder.alive_at > watched.alive_at
                ):
                    raise NameInUse(in_use_message(node, holder))  # it ticked: it lives
                elif holder.age > timeout or _ran_here_and_ended(holder, me):
                    free = True
                else:
                    free, watched = False, holder
                if free:
                    conn.execute(_CLAIM_SQL, me.params(node))
                    return time.monotonic() - started
            time.sleep(POLL_SECONDS)


class NodeName:
    """This node's name as this run holds it: claimed at start, then watched by the
    cluster limiter's tick (which reports who holds it)."""

    def __init__(self, node: str, conninfo: str, clean: Callable[[psycopg.Error], str]) -> None:
        self.node = node
        self._conninfo = conninfo  # a secret: never logged, never in a repr
        self._clean = clean
        self.identity = Identity.of_this_process()
        # Who holds the name instead of this run, as the last tick saw it (else None).
        self.taken: Holder | None = None

    def __repr__(self) -> str:
        return f"NodeName({self.node!r})"

    def claim(self, timeout: float) -> None:
        """At start: take the name for this run (deleting the leases an earlier run left
        under it), or NameInUse while a live node holds it. Blocking, before the node
        serves: at most `timeout` when the row may be another node's. A database that
        fails is logged and left to the ticks, which claim the name only if it is free
        or silent past the lease timeout."""
        try:
            waited = claim(self._conninfo, self.node, self.identity, timeout)
        except psycopg.Error as e:
            log.warning(
                "limits.start_claim_failed",
                error=self._clean(e),
                hint="this node claims its server.name and deletes its earlier leases "
                "once the database answers",
            )
            return
        if waited >= 1.0:
            log.info("limits.name_claimed", node=self.node, waited_seconds=round(waited, 1))

    def held_by(self, other: Holder | None) -> None:
        """What a tick found: the name is this run's (None) or `other`'s."""
        if other is not None and self.taken is None:
            log.error(
                "limits.name_in_use",
                node=self.node,
                error=in_use_message(self.node, other),
                hint="this node enforces its share of each limit until the name is its own "
                "again; restart it with a server.name of its own",
            )
        elif other is None and self.taken is not None:
            log.info("limits.name_regained", node=self.node)
        self.taken = other
