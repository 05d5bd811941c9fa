"""One running node per server.name on a shared PostgreSQL (service/node_name.py).

Two nodes given one `server.name` used to delete each other's concurrency leases (each
took the other's for its own earlier run's) and `status` listed one node. Now a second
node whose name a live node holds refuses to start, naming the problem and the fix,
while a node restarting under its own name after a crash (kill -9) or a clean stop
starts at once, and a row left by a run that cannot be proven this machine's previous
one is waited out for at most the lease timeout.

The first tests run real vibectld processes (tests/cluster.py's Node: its own config,
credentials, state directory and port, the real `vibectl-admin`) on a real PostgreSQL
15; the last ones drive the claim and the limiter's tick directly, on the same
database, where a row's age or machine must be set by the test (a second machine
cannot be had here, so its row is written as one would be).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench.postgres import free_port
from tests.cluster import HOST, Caller, Node, generate_cluster_key, wait_until
from tests.postgres import Postgres
from vibectl.proxy_url import parse as parse_url
from vibectl.tls_pin import pinned_ca
from vibectld.ops.metrics import Metrics
from vibectld.service import cluster_limits
from vibectld.service.cluster_limits import ClusterLimiter
from vibectld.service.limits import Limiter
from vibectld.service.node_name import Identity, NameInUse, claim
from vibectld.store.postgresql import PostgreSQLDatabase

pytestmark = pytest.mark.timeout(300)

NAME = "bastion-1"


class Nodes:
    """Nodes on one database and cluster key, made as an operator would install them."""

    def __init__(self, root: Path, dsn: str) -> None:
        self.root = root
        self.dsn = dsn
        self.key = generate_cluster_key()
        self.made: list[Node] = []

    def node(self, directory: str, name: str = NAME) -> Node:
        port = free_port()
        node = Node(
            self.root / directory,
            name,
            port,
            server={
                "listen": f"127.0.0.1:{port}",
                "name": name,
                "public_url": f"vibectl-server://{HOST}:{port}",
            },
            storage={"backend": "postgresql"},
            logging={"level": "info", "format": "json"},
        )
        node.install_credentials(self.dsn, self.key)
        self.made.append(node)
        return node

    def close(self) -> None:
        for node in self.made:
            node.close()


@pytest.fixture
def nodes(tmp_path: Path, postgres: Postgres) -> Iterator[Nodes]:
    made = Nodes(tmp_path, postgres.dsn)
    try:
        yield made
    finally:
        for node in made.made:
            print(f"--- {node.root.name} ---\n{node.log_tail()}")
        made.close()


def caller_on(node: Node, url: str) -> Caller:
    target = parse_url(url)
    assert target.ca_sha256
    return Caller(url, pinned_ca(HOST, node.fixed_port, target.ca_sha256))


def leases(postgres: Postgres) -> int:
    # Every lease in the test's database is NAME's: no other node runs there.
    return int(postgres.sql("SELECT count(*) FROM leases"))


def hold_a_call(caller: Caller, node: Node, seconds: float) -> threading.Thread:
    """A call of `seconds` on `node`, running in a thread, once its lease is taken."""
    thread = threading.Thread(
        target=caller.call,
        args=(node.fixed_port, f"sleep:{seconds:g}"),
        kwargs={"model": "faults", "timeout": seconds + 30},
        daemon=True,
    )
    thread.start()
    assert wait_until(lambda: node.admin("status")["in_flight_by_client"].get("solo"), 10)
    return thread


def test_a_second_node_with_a_name_in_use_refuses_to_start(
    nodes: Nodes, postgres: Postgres
) -> None:
    first = nodes.node("first")
    first.start()
    solo = caller_on(first, first.cli("issue-client", "solo", "--concurrency", "1").stdout.strip())
    held = hold_a_call(solo, first, 20)
    assert leases(postgres) == 1
    listed = wait_until(lambda: first.json("status")["nodes"], 10)
    address = listed[0]["address"]

    # The operator copied the first node's vibectld.yaml to a second machine unchanged.
    second = nodes.node("second")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="did not become ready"):
        second.start()
    took = time.monotonic() - started
    assert second.proc is not None
    assert second.proc.wait(10) == 1  # a start-up error, as a bad configuration
    log = second.log_path.read_text()
    assert (
        f"server.name '{NAME}' is already in use by a live node (last seen" in log
        and f"pid {first.pid} on {os.uname().nodename}" in log
        and "give each node its own server.name in its configuration file" in log
    ), log
    print(f"\nrefused {took:.1f} s after it was started (the process's start included)")

    # The first node's running call keeps its lease, and its slot is still taken.
    assert leases(postgres) == 1
    second_call = solo.call(first.fixed_port)
    assert (second_call.code, second_call.limit_type) == ("RESOURCE_EXHAUSTED", "concurrency")
    # Its row in `status` is its own: the refused node never wrote one.
    assert [(n["name"], n["address"], n["silent"]) for n in first.json("status")["nodes"]] == [
        (NAME, address, False)
    ]
    held.join(40)


def test_a_node_killed_and_started_again_under_its_name_starts_at_once(
    nodes: Nodes, postgres: Postgres
) -> None:
    node = nodes.node("node")
    node.start()
    solo = caller_on(node, node.cli("issue-client", "solo", "--concurrency", "1").stdout.strip())
    hold_a_call(solo, node, 60)
    assert leases(postgres) == 1
    node.kill()
    killed = time.monotonic()
    node.start()
    print(f"\nready {time.monotonic() - killed:.1f} s after the kill -9")
    # Within the lease timeout of the kill, its row's age would still make it live: the
    # restart proved the row was its own previous run's (this machine, a pid that no
    # longer runs) instead of waiting it out (which it logs, when it does).
    assert "limits.name_claimed" not in node.log_path.read_text()
    # The killed run's lease went with it: the one slot is free at once.
    assert leases(postgres) == 0
    outcome = solo.call(node.fixed_port)
    assert outcome.code == "OK", outcome


def test_a_clean_stop_frees_the_name_for_another_machine(nodes: Nodes) -> None:
    old = nodes.node("old")
    old.start()
    assert old.stop() == 0
    # Moved to a new machine (here: another directory and port), under the same name.
    new = nodes.node("new")
    new.start()
    listed = wait_until(lambda: [n["name"] for n in new.json("status")["nodes"]], 10)
    assert listed == [NAME]


# -- the claim and the tick, driven directly -----------------------------------------------


@pytest.fixture
def db(postgres: Postgres) -> Iterator[PostgreSQLDatabase]:
    database = PostgreSQLDatabase.open(postgres.dsn)  # the schema, with the functions
    yield database
    database.close()


def write_row(dsn: str, identity: Identity, age: float = 0.0) -> None:
    """A lease_holders row for NAME as `identity`'s tick would leave it, `age` s ago."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO lease_holders (node, alive_at, instance, host, pid, machine) "
            "VALUES (%s, extract(epoch FROM clock_timestamp()) - %s, %s, %s, %s, %s)",
            (NAME, age, identity.instance, identity.host, identity.pid, identity.machine),
        )


def a_dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_this_machines_previous_run_is_taken_over_without_waiting(db: PostgreSQLDatabase) -> None:
    me = Identity.of_this_process()
    assert me.machine is not None, "this machine's /proc has no boot id or pid namespace"
    previous = Identity("earlier-run", me.host, a_dead_pid(), me.machine)
    write_row(db.conninfo, previous)  # ticked just now, then died
    waited = claim(db.conninfo, NAME, me, cluster_limits.LEASE_TIMEOUT)
    assert waited < 0.5


def test_a_silent_row_of_another_machine_is_waited_out_then_taken(db: PostgreSQLDatabase) -> None:
    me = Identity.of_this_process()
    # Another machine's node that ticked 3 s ago and never again: dead or cut off, but
    # nothing here can prove it, so the claim waits until the lease timeout says so.
    elsewhere = Identity("other-run", "bastion-2", me.pid, "another-boot pid:[1]")
    write_row(db.conninfo, elsewhere, age=3.0)
    waited = claim(db.conninfo, NAME, me, cluster_limits.LEASE_TIMEOUT)
    assert 2.0 < waited < cluster_limits.LEASE_TIMEOUT, waited


def test_a_row_that_is_refreshed_is_a_live_node(db: PostgreSQLDatabase) -> None:
    me = Identity.of_this_process()
    # Another machine's node, with this very pid in its own namespace: the pid proves
    # nothing there, and its ticks make it live.
    live = Identity("other-run", "bastion-2", me.pid, "another-boot pid:[1]")
    write_row(db.conninfo, live)
    stop = threading.Event()

    def tick() -> None:
        with psycopg.connect(db.conninfo, autocommit=True) as conn:
            while not stop.wait(0.5):
                conn.execute(
                    "UPDATE lease_holders SET alive_at = extract(epoch FROM clock_timestamp())"
                )

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        started = time.monotonic()
        with pytest.raises(NameInUse) as refused:
            claim(db.conninfo, NAME, me, cluster_limits.LEASE_TIMEOUT)
        assert time.monotonic() - started < 2.0
    finally:
        stop.set()
        ticker.join()
    assert str(refused.value).startswith(
        f"server.name '{NAME}' is already in use by a live node (last seen 0 s ago, "
        f"pid {me.pid} on bastion-2); give each node its own server.name"
    )


def test_a_node_whose_name_was_taken_keeps_to_its_share_and_leaves_the_leases_alone(
    db: PostgreSQLDatabase, postgres: Postgres
) -> None:
    """Cut off for longer than the lease timeout, a node's name was taken by a second
    node given the same name: back, the first neither refreshes the row nor deletes
    the second's leases, and decides its calls on its share, saying why."""

    def limiter() -> ClusterLimiter:
        made = ClusterLimiter(
            db.conninfo, NAME, Limiter(), lambda: False, lambda: [], Metrics(), db.clean
        )
        made.name.claim(cluster_limits.LEASE_TIMEOUT)
        return made

    async def test() -> None:
        first = limiter()
        await first.tick()
        # The first node falls silent: its row ages past the lease timeout.
        postgres.sql("UPDATE lease_holders SET alive_at = alive_at - 60")
        second = limiter()
        await second.tick()
        lease = await second.acquire("client-1", 1)
        assert lease.id is not None
        postgres.sql("UPDATE leases SET started_at = started_at - 60")  # past the grace
        await first.tick()
        assert first.name.taken is not None
        assert first.name.taken.host == second.name.identity.host
        assert leases(postgres) == 1  # the second node's
        await first.acquire("client-1", 1)  # its share alone (no database lease)
        metrics = first._metrics.registry
        assert (
            metrics.get_sample_value("vibectld_limit_fallbacks_total", {"reason": "name_in_use"})
            == 1.0
        )
        # A clean stop of the first removes nothing of the second's.
        await first.close()
        assert leases(postgres) == 1
        assert postgres.sql("SELECT instance FROM lease_holders") == (second.name.identity.instance)
        second.release(lease)
        await second.close()
        assert postgres.sql("SELECT count(*) FROM lease_holders") == "0"

    asyncio.run(asyncio.wait_for(test(), 60))
