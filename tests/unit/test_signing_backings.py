"""Both backings of the signing keys pass the same tests: files (one node) and the sealed
rows of a cluster's PostgreSQL database (several nodes).

A "restart" is a second SigningKeys on the same backing's storage; "another node" is a
second SigningKeys on it while the first keeps running (refresh() is what the change feed
calls when that node hears of the change).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.postgres import Postgres, postgres, postgres_server
from vibectld.pki import cluster
from vibectld.pki.key_files import KeyDirectory
from vibectld.pki.kids import KeyBacking, new_kid
from vibectld.pki.sealed import ClusterKey, ClusterKeyError
from vibectld.pki.signing import (
    SigningKeyInUse,
    SigningKeys,
    TokenError,
    UnknownSigningKey,
)
from vibectld.pki.tls import ca_fingerprint
from vibectld.store.registry import Registry

__all__ = ["postgres", "postgres_server"]

NOW = 1_900_000_000
Backings = Callable[[], KeyBacking]


@pytest.fixture(params=["files", "postgresql"])
def backing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backings]:
    """A maker of backings that all share one storage (a directory, a database)."""
    if request.param == "files":
        yield lambda: KeyDirectory(tmp_path / "signing-keys")
        return
    pg: Postgres = request.getfixturevalue("postgres")
    key = ClusterKey.generate()[0]
    opened: list[Registry] = []

    def make() -> KeyBacking:
        registry = Registry.open_postgresql(pg.dsn)
        opened.append(registry)
        return cluster.DatabaseKeys(registry, key)

    yield make
    for registry in opened:
        registry.close()


def sign(keys: SigningKeys, kid: str | None = None) -> str:
    return keys.sign(sub="alice", jti="j1", iat=NOW, exp=NOW + 60, iss="i", aud="a", kid=kid)


def verify(keys: SigningKeys, token: str) -> str:
    return keys.verify(token, iss="i", aud="a", now=NOW).kid


def test_a_first_key_is_made_once(backing: Backings) -> None:
    first = SigningKeys(backing())
    assert first.kids == (first.active_kid,) and first.retired_kids == ()
    again = SigningKeys(backing())
    assert again.kids == first.kids
    assert verify(again, sign(first)) == first.active_kid


def test_rotate_signs_with_the_new_key_and_the_old_one_still_verifies(backing: Backings) -> None:
    keys = SigningKeys(backing())
    old_kid, old_token = keys.active_kid, sign(keys)
    new = keys.rotate()
    assert new > old_kid and keys.active_kid == new and keys.kids == (old_kid, new)
    assert verify(keys, sign(keys)) == new
    assert verify(keys, old_token) == old_kid
    restarted = SigningKeys(backing())
    assert restarted.active_kid == new and verify(restarted, old_token) == old_kid


def test_retire_refuses_its_secrets_now_and_after_a_restart(backing: Backings) -> None:
    keys = SigningKeys(backing())
    old_kid, old_token = keys.active_kid, sign(keys)
    keys.rotate()
    keys.retire(old_kid)
    with pytest.raises(TokenError) as refused:
        verify(keys, old_token)
    assert refused.value.reason == TokenError.RETIRED_KEY
    restarted = SigningKeys(backing())
    assert restarted.retired_kids == (old_kid,) and not restarted.verifies(old_kid)
    with pytest.raises(TokenError):
        verify(restarted, old_token)


def test_what_retire_refuses(backing: Backings) -> None:
    keys = SigningKeys(backing())
    only = keys.active_kid
    with pytest.raises(SigningKeyInUse, match="current and only one"):
        keys.retire(only)
    with pytest.raises(UnknownSigningKey, match="no signing key has the kid"):
        keys.retire(new_kid(None))
    keys.rotate()
    keys.retire(only)
    with pytest.raises(SigningKeyInUse, match="already retired"):
        keys.retire(only)


def test_another_node_s_rotation_and_retirement_reach_this_one_by_refresh(
    backing: Backings,
) -> None:
    here, there = SigningKeys(backing()), SigningKeys(backing())
    first = here.active_kid
    token = sign(here)
    made_there = there.rotate()
    here.refresh()
    assert here.active_kid == made_there and verify(here, sign(there)) == made_there
    there.retire(first)
    assert verify(here, token) == first  # not heard of yet
    here.refresh()
    with pytest.raises(TokenError, match="retired key"):
        verify(here, token)


def test_a_rotation_here_sorts_after_a_key_made_elsewhere(backing: Backings) -> None:
    here, there = SigningKeys(backing()), SigningKeys(backing())
    made_there = there.rotate()
    made_here = here.rotate()  # without having heard of made_there
    if not here.shared:
        # Files: each node picks after what it has loaded (one node per directory).
        assert made_here != made_there
    else:
        assert made_here > made_there


# -- the database backing only -------------------------------------------------------------


def test_the_current_key_is_the_cluster_s_not_this_node_s_view(backing: Backings) -> None:
    here, there = SigningKeys(backing()), SigningKeys(backing())
    first = here.active_kid
    there.rotate()
    if not here.shared:
        # One node per directory: what it has loaded is all there is.
        with pytest.raises(SigningKeyInUse):
            here.retire(first)
        return
    # The database decides: `first` no longer signs anywhere, so it may be retired, and
    # this node learns of the newer key on the way.
    here.retire(first)
    assert here.active_kid == there.active_kid and not here.verifies(first)


def test_nodes_starting_together_make_one_ca_and_one_key(postgres: Postgres) -> None:
    key = ClusterKey.generate()[0]
    registries = [Registry.open_postgresql(postgres.dsn) for _ in range(4)]
    start = threading.Barrier(len(registries))
    fingerprints: list[str] = []
    kids: list[tuple[str, ...]] = []

    def node(registry: Registry) -> None:
        start.wait()
        ca = cluster.join(registry, key, "lb.example.test")
        fingerprints.append(ca_fingerprint(ca.cert_pem))
        kids.append(SigningKeys(cluster.DatabaseKeys(registry, key)).kids)

    threads = [threading.Thread(target=node, args=(r,)) for r in registries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert len(fingerprints) == 4 and len(set(fingerprints)) == 1
        assert len(kids) == 4 and len(set(kids)) == 1 and len(kids[0]) == 1
        rows = registries[0].transact(
            lambda tx: tx.select("SELECT name FROM cluster_secrets ORDER BY name")
        )
        assert [r[0] for r in rows] == ["ca", "check"]
    finally:
        for registry in registries:
            registry.close()


def test_another_cluster_key_is_refused_by_the_check(postgres: Postgres) -> None:
    registry = Registry.open_postgresql(postgres.dsn)
    try:
        cluster.join(registry, ClusterKey.generate()[0], "lb.example.test")
        with pytest.raises(ClusterKeyError, match="does not open with this node's cluster-key"):
            cluster.join(registry, ClusterKey.generate()[0], "lb.example.test")
    finally:
        registry.close()


def test_the_follower_reloads_once_for_a_burst_and_names_the_retired_kids(
    backing: Backings,
) -> None:
    here, there = SigningKeys(backing()), SigningKeys(backing())
    first = here.active_kid
    newer = there.rotate()
    there.retire(first)
    told: list[frozenset[str]] = []
    done = threading.Event()

    def on_retired(kids: frozenset[str]) -> None:
        told.append(kids)
        done.set()

    follower = cluster.KeyFollower(here, on_retired)
    for _ in range(5):  # the feed may bring several changes at once
        follower.changed(newer)
    assert done.wait(10)
    assert here.active_kid == newer and not here.verifies(first)
    assert told[0] == frozenset({first})
    # Later reloads of the burst find nothing more retired, and say nothing.
    time.sleep(0.3)
    assert told == [frozenset({first})]
