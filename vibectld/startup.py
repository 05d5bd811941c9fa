"""What the daemon opens before it serves anything: the state directory, the store, and
on a cluster the signing keys and CA it shares with the other nodes.

Kept apart from daemon.py's lifecycle: this is done once, in order, and any failure here
is a StartupError whose message names the cause and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog

from vibectld.config import DaemonConfig
from vibectld.generation import GenerationRejected, build_generation
from vibectld.pki import cluster
from vibectld.pki.sealed import ClusterKey, ClusterKeyError
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import CertificateAuthority, default_hosts
from vibectld.providers.catalogue import point_llm_at
from vibectld.providers.execution import Executor
from vibectld.providers.keys import ProviderKeys
from vibectld.runtime import Runtime
from vibectld.store.journal import DIRECTORY as USAGE_JOURNAL
from vibectld.store.registry import Registry

log = structlog.get_logger("vibectld")

# The credential holding storage.backend: postgresql's libpq connection string.
DSN_CREDENTIAL = "postgresql-dsn"
# The credential holding the key that seals the cluster's private keys in its database.
CLUSTER_KEY_CREDENTIAL = "cluster-key"


class StartupError(Exception):
    """The daemon cannot start; the message names the cause and the fix."""


def open_state(config: DaemonConfig) -> Runtime:
    """The state directory, its keys and registry, and the first generation.

    Called on the event loop: a shared store's followers act on it.
    """
    state_dir = config.state_dir
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StartupError(
            f"cannot create state_dir {state_dir}: {e.strerror}; create it for the "
            "vibectld user or set state_dir"
        ) from None
    point_llm_at(state_dir)
    ca: CertificateAuthority | None = None
    if config.storage.backend == "sqlite":
        signing = SigningKeys.load_or_create(state_dir / "signing-keys")
        registry = open_registry(config)
    else:
        # Several nodes: the signing keys and the CA are the cluster's, in its database.
        registry = open_registry(config)
        try:
            signing, ca = join_cluster(config, registry)
        except BaseException:
            registry.close()
            raise
    try:
        generation = build_generation(config, signing, registry, ca=ca)
    except GenerationRejected as e:
        registry.close()
        raise StartupError(str(e)) from None
    executor = Executor(config.models.sync_workers)
    rt = Runtime(generation=generation, signing=signing, registry=registry, executor=executor)
    if signing.shared:
        follow_signing_keys(rt, asyncio.get_running_loop())
    if registry.shared:
        rt.metrics.watch_feed(registry.feed_listener)
        # rpm and concurrency across the nodes (psycopg: only a shared store imports it).
        from vibectld.service.cluster_limits import limit_across_nodes
        from vibectld.service.node_name import NameInUse

        try:
            limit_across_nodes(rt, registry)
        except NameInUse as e:
            registry.close()
            raise StartupError(str(e)) from None
    return rt


def open_registry(config: DaemonConfig) -> Registry:
    """The configured store, opened and loaded (StartupError, StorageFailure, ...)."""
    # Every counted call is also journaled here at once: a kill loses none (journal.py).
    journal = config.state_dir / USAGE_JOURNAL
    if config.storage.backend == "sqlite":
        return Registry.open(config.state_dir / "registry.db", journal=journal)
    credentials = ProviderKeys.for_credentials(config.config_dir)
    dsn = credentials.get(DSN_CREDENTIAL)
    if dsn is None:
        raise StartupError(
            "storage.backend is postgresql, but the postgresql-dsn credential is missing: "
            f"put a libpq connection string in {_places(credentials, DSN_CREDENTIAL)}"
        )
    return Registry.open_postgresql(dsn, journal=journal)


def _places(credentials: ProviderKeys, name: str) -> str:
    """Where a missing credential `name` may be put, for the error that names the fix."""
    places = " or ".join(str(p) for p in credentials.places(name))
    if credentials.credentials_dir is None:
        places += f" (or $CREDENTIALS_DIRECTORY/{name} through LoadCredential=)"
    return places


def join_cluster(
    config: DaemonConfig, registry: Registry
) -> tuple[SigningKeys, CertificateAuthority]:
    """This node's cluster key, checked against the database; the cluster's signing keys
    and CA, created there if this node is the first (StartupError naming the fix)."""
    credentials = ProviderKeys.for_credentials(config.config_dir)
    text = credentials.get(CLUSTER_KEY_CREDENTIAL)
    if text is None:
        raise StartupError(
            "storage.backend is postgresql, but the cluster-key credential is missing: make "
            "one once with `vibectld --generate-cluster-key` and put the same file on every "
            f"node, in {_places(credentials, CLUSTER_KEY_CREDENTIAL)}"
        )
    first_host = default_hosts(config.server.public_host)[0]
    try:
        key = ClusterKey.parse(text)
        ca = cluster.join(registry, key, first_host)
        signing = SigningKeys(cluster.DatabaseKeys(registry, key))
    except ClusterKeyError as e:
        raise StartupError(str(e)) from None
    return signing, ca


def follow_signing_keys(rt: Runtime, loop: asyncio.AbstractEventLoop) -> None:
    """Reload the signing keys as the change feed brings a rotation or retirement from any
    node; a key retired elsewhere ends its clients' calls here too, as on the node that
    retired it."""

    def cancel(kids: frozenset[str]) -> None:
        for kid in sorted(kids):
            clients = rt.registry.active_signed_by(kid)
            cancelled = sum(rt.inflight.cancel_client(record.id) for record in clients)
            log.info(
                "signing_key.retired_elsewhere",
                kid=kid,
                active_clients=len(clients),
                cancelled_calls=cancelled,
            )

    def on_retired(kids: frozenset[str]) -> None:
        # From the reload's thread: the calls in flight belong to the loop. A loop already
        # closed has no calls left to end.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(cancel, kids)

    rt.registry.on_key_change(cluster.KeyFollower(rt.signing, on_retired).changed)
