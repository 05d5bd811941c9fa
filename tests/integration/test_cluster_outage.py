"""PostgreSQL stops under load and comes back: what three nodes do meanwhile.

Nodes 1 and 2 run `storage.on_stale: serve`, node 3 `refuse`, all with
`storage.max_staleness: 1s` (the least allowed) so that an outage of a few seconds makes
every node's view stale. One known client per node calls it directly, without pause,
the whole time (straight to the node, not through HAProxy, so each node's behaviour is
seen on its own). The server is stopped (`pg_ctl stop -m fast`: every connection cut),
kept down for 4 s, and started again. Then:

- `serve` nodes fail no call, and enforce a client's rpm as their share of it (6 // 3);
- the `refuse` node answers UNAVAILABLE only while it is stale: none before the stop,
  at least one during the outage, none once it says it is fresh again;
- status says degraded on every node during the outage, and an admin write fails at
  once and clearly (exit 1), on a node of either mode;
- no restart is needed: the nodes recover by themselves, and the usage the database
  shows afterwards is exactly every call the clients saw served.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from bench.postgres import PostgresCluster
from tests.cluster import (
    Caller,
    Cluster,
    Node,
    Outcome,
    cluster_in,
    pg_ctl_apart,
    shared_database,
    usage_by_name,
    wait_until,
)
from tests.postgres import Postgres

pytestmark = pytest.mark.timeout(300)

MAX_STALENESS = 1.0
OUTAGE_SECONDS = 4.0


@pytest.fixture(scope="module")
def database(postgres_server: PostgresCluster) -> Iterator[Postgres]:
    with shared_database(postgres_server, "cluster_outage") as db:
        yield db


@pytest.fixture(scope="module")
def cluster(database: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    storage = {"max_staleness": f"{MAX_STALENESS:g}s"}
    yield from cluster_in(
        tmp_path_factory.mktemp("outage"),
        database.dsn,
        storage=storage,
        per_node=[
            {"storage": {"on_stale": "serve"}},
            {"storage": {"on_stale": "serve"}},
            {"storage": {"on_stale": "refuse"}},
        ],
    )


def _fresh(node: Node) -> bool:
    """Whether the node says its view is fresh again (what ends `refuse`)."""
    storage = node.json("status")["storage"]
    age = storage["view_age_seconds"]
    return (
        not storage["degraded"]
        and not storage.get("stale", False)
        and (age is None or age <= MAX_STALENESS)
    )


def test_postgresql_down_under_load(cluster: Cluster, database: Postgres) -> None:
    callers: dict[str, tuple[Node, Caller]] = {}
    for i, node in enumerate(cluster.nodes):
        # Issued on the node it calls, its pin fetched there: this test needs nothing
        # shared but the database.
        caller = cluster.caller(cluster.issue_over_socket(f"user-of-{node.name}", on=i), via=node)
        assert wait_until(lambda n=node, c=caller: c.known_on(n.fixed_port), 5)
        callers[f"user-of-{node.name}"] = (node, caller)

    node1, node2, node3 = cluster.nodes
    # Every node has heard every other's heartbeat (every 2 s): the share of a limit each
    # takes while cut off is counted over the nodes it last knew alive.
    names = {n.name for n in cluster.nodes}
    for node in cluster.nodes:
        assert wait_until(
            lambda n=node: {e["name"] for e in n.admin("status")["nodes"]} == names, 10
        )
    # A client with --rpm 6 that has made no call yet: cut off from the database, each
    # node enforces its share, 6 // 3 nodes = 2 a minute.
    limited = cluster.caller(cluster.issue_over_socket("limited", rpm=6), via=node1)
    for node in (node1, node2):
        assert wait_until(lambda n=node: limited.known_on(n.fixed_port), 5)

    stop = threading.Event()
    seen: dict[str, list[Outcome]] = {name: [] for name in callers}

    def load(name: str) -> None:
        node, caller = callers[name]
        while not stop.is_set():
            seen[name].append(caller.on(node))
            time.sleep(0.01)

    workers = [threading.Thread(target=load, args=(name,)) for name in callers]
    for w in workers:
        w.start()
    try:
        time.sleep(1.0)
        stopped_at = time.monotonic()
        pg_ctl_apart(database.cluster, "stop")
        try:
            time.sleep(MAX_STALENESS + 1.0)
            degraded = {n.name: n.json("status")["storage"] for n in cluster.nodes}
            health = {
                (n.name, service): callers[f"user-of-{n.name}"][1].health(n.fixed_port, service)
                for n in cluster.nodes
                for service in ("", "vibectld.storage")
            }
            shares = {n.name: [limited.on(n) for _ in range(4)] for n in (node1, node2)}
            # An admin write fails at once and says why, whichever mode the node is in.
            writes = {}
            for n in cluster.nodes:
                began = time.monotonic()
                writes[n.name] = (
                    n.cli("issue-client", f"during-{n.name}"),
                    time.monotonic() - began,
                )
            time.sleep(max(0.0, stopped_at + OUTAGE_SECONDS - time.monotonic()))
        finally:
            pg_ctl_apart(database.cluster, "start")
        started_at = time.monotonic()
        fresh_at: dict[str, float] = {}
        for node in cluster.nodes:
            assert wait_until(lambda n=node: _fresh(n), 15), node.json("status")["storage"]
            fresh_at[node.name] = time.monotonic()
        time.sleep(1.0)
    finally:
        stop.set()
        for w in workers:
            w.join(60)

    for name, storage in degraded.items():
        assert storage["degraded"] is True, (name, storage)
    # The health service: the store is NOT_SERVING everywhere; the node as a whole only
    # where it refuses calls.
    assert health == {
        ("node-1", ""): "SERVING",
        ("node-2", ""): "SERVING",
        ("node-3", ""): "NOT_SERVING",
        ("node-1", "vibectld.storage"): "NOT_SERVING",
        ("node-2", "vibectld.storage"): "NOT_SERVING",
        ("node-3", "vibectld.storage"): "NOT_SERVING",
    }
    for n in cluster.nodes:
        caller = callers[f"user-of-{n.name}"][1]
        assert caller.health(n.fixed_port, "vibectld.storage") == "SERVING", n.name
        assert caller.health(n.fixed_port) == "SERVING", n.name
    for name, (out, seconds) in writes.items():
        assert out.returncode == 1 and out.stdout == "", (name, out)
        assert "database" in out.stderr, (name, out.stderr)
        # At once: not after a connection timeout (the CLI's own start-up is most of it).
        assert seconds < 5, (name, seconds)
        assert database.cluster.password not in out.stderr

    for name, outcomes in shares.items():
        assert [(o.code, o.limit_type) for o in outcomes] == [("OK", None)] * 2 + [
            ("RESOURCE_EXHAUSTED", "rpm")
        ] * 2, name
    for node in (node1, node2):
        outcomes = seen[f"user-of-{node.name}"]
        failed = [o for o in outcomes if o.code != "OK"]
        assert not failed, f"{node.name} (serve) failed {len(failed)} calls: {failed[:3]}"
        assert any(stopped_at < o.started < started_at for o in outcomes)

    strict = seen[f"user-of-{node3.name}"]
    refused = [o for o in strict if o.code != "OK"]
    assert refused, "the refuse node never refused: the outage did not make it stale"
    assert all(o.code == "UNAVAILABLE" for o in refused), refused[:3]
    assert all(o.started >= stopped_at for o in refused), "refused before the outage"
    # A call that started after the node said it was fresh is served (0.1 s: the status
    # poll's own round trip).
    late = [o for o in refused if o.started > fresh_at[node3.name] + 0.1]
    assert not late, late[:3]
    assert any(o.code == "OK" and o.started > fresh_at[node3.name] for o in strict)

    # Nothing served is lost: the counts buffered during the outage reach the database.
    served = {name: sum(o.code == "OK" for o in outs) for name, outs in seen.items()}
    served["limited"] = 4

    def usage() -> dict[str, int]:
        rows = usage_by_name(node1)
        return {name: rows.get(name, 0) for name in served}

    assert wait_until(lambda: usage() == served, 15, interval=0.5), (usage(), served)
    for node in (node2, node3):
        assert {k: v for k, v in usage_by_name(node).items() if k in served} == served
    print(
        f"outage {OUTAGE_SECONDS:g}s: served {served}; node-3 refused {len(refused)} "
        f"calls; fresh again after "
        + ", ".join(f"{k} {v - started_at:.2f} s" for k, v in fresh_at.items())
    )
