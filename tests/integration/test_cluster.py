"""Three vibectld nodes on one PostgreSQL database, behind HAProxy: the released paths.

One cluster (tests/cluster.py: three vibectld processes, HAProxy in TCP mode in front)
serves the whole module, since starting it costs a few seconds; each test uses clients
of its own, so they do not interfere.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bench.postgres import PostgresCluster
from tests.cluster import Cluster, cluster_in, shared_database, wait_until

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    with shared_database(postgres_server, "cluster_three_nodes") as db:
        yield from cluster_in(tmp_path_factory.mktemp("cluster"), db.dsn)


def test_status_on_every_node_lists_the_three_nodes(cluster: Cluster) -> None:
    names = {n.name for n in cluster.nodes}
    for node in cluster.nodes:
        listed = wait_until(
            lambda n=node: {e["name"] for e in n.json("status").get("nodes", [])} >= names, 10
        )
        assert listed, f"{node.name} status: {node.json('status').get('nodes')}"
        rows = {e["name"]: e for e in node.json("status")["nodes"]}
        for name in names:
            row = rows[name]
            assert row["version"] and row["heartbeat_at"] > 0 and row["in_flight"] >= 0
            assert str(cluster.node(name).fixed_port) in str(row["address"])
