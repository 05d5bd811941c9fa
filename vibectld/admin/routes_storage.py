"""The admin operation that moves a node's store to PostgreSQL: `storage_migrate`.

The daemon does the copy because it has the SQLite store open (and vibectl-admin may not
read daemon files). It reads the two credentials exactly as a PostgreSQL node will, so
that a migration that works here means the same files will work after the restart; the
copy itself is store/transfer.py. Registered in the one route table (routes.py imports
this module).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from vibectld.admin.protocol import ErrorCode
from vibectld.admin.routes import AdminContext, route
from vibectld.admin.server import AdminError, Caller
from vibectld.pki.sealed import ClusterKey, ClusterKeyError
from vibectld.providers.keys import ProviderKeyError, ProviderKeys
from vibectld.runtime import Runtime
from vibectld.startup import CLUSTER_KEY_CREDENTIAL, DSN_CREDENTIAL
from vibectld.store import transfer
from vibectld.store.registry import Registry

# The credentials are named as a PostgreSQL node reads them (startup.py).
_WHAT = {
    DSN_CREDENTIAL: "a libpq connection string to an empty database",
    CLUSTER_KEY_CREDENTIAL: "the output of: vibectld --generate-cluster-key",
}


@route("storage_migrate", write=True)
async def storage_migrate(
    ctx: AdminContext, caller: Caller, args: dict[str, Any]
) -> dict[str, Any]:
    if args.get("target") != "postgresql":
        raise AdminError(ErrorCode.BAD_REQUEST, "target must be 'postgresql'")
    # Credential files, the key files and both databases: all of it off the event loop.
    copied, where = await asyncio.to_thread(_migrate, ctx.rt, caller)
    structlog.get_logger("vibectld.audit").info(
        "storage.migrated",
        audit=True,
        to=where,
        by=f"{caller.user} (uid {caller.uid})",
        # Prefixed: "audit" (the rows copied) would collide with the record's own flag.
        **{f"copied_{what}": n for what, n in copied.to_dict().items()},
    )
    return {"target": "postgresql", "where": where, "copied": copied.to_dict()}


def _migrate(rt: Runtime, caller: Caller) -> tuple[transfer.Copied, str]:
    registry = rt.registry
    if registry.backend != "sqlite":
        raise AdminError(
            ErrorCode.FAILED,
            "this node already keeps its state in PostgreSQL: there is nothing to migrate",
        )
    # The copy reads the tables in one of the registry's own transactions (transact).
    assert isinstance(registry, Registry), "the daemon's store is a Registry"
    gen = rt.generation
    config = gen.config
    dsn, key_text = _credentials(ProviderKeys.for_credentials(config.config_dir))
    try:
        key = ClusterKey.parse(key_text)
    except ClusterKeyError as e:
        raise AdminError(ErrorCode.FAILED, str(e)) from None
    files = transfer.read_cluster_files(
        config.state_dir,
        key,
        serving_ca_sha256=gen.tls.ca_sha256,
        self_managed=config.server.tls.cert_file is None,
    )
    # The files must be the keys this node verifies with: a key file added or moved by
    # hand since the start would verify on the cluster but not here, or the reverse.
    verifying = {k.kid for k in files.keys if k.retired_at is None}
    retired = {k.kid for k in files.keys if k.retired_at is not None}
    if verifying != set(rt.signing.kids) or retired != set(rt.signing.retired_kids):
        raise AdminError(
            ErrorCode.FAILED,
            f"the signing-key files in {config.state_dir / 'signing-keys'} are not the keys "
            "this node uses (changed since the start?); restart vibectld, then migrate",
        )
    return transfer.copy_to_postgresql(
        registry, dsn, files, transfer.Caller(caller.uid, caller.user)
    )


def _credentials(credentials: ProviderKeys) -> tuple[str, str]:
    """The DSN and the cluster key's text; one error naming every missing one and where
    to put it."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in (DSN_CREDENTIAL, CLUSTER_KEY_CREDENTIAL):
        try:
            value = credentials.get(name)
        except ProviderKeyError as e:
            raise AdminError(ErrorCode.FAILED, str(e)) from None
        if value is None:
            places = [str(p) for p in credentials.places(name)]
            if credentials.credentials_dir is None:
                places.append(f"$CREDENTIALS_DIRECTORY/{name} (through LoadCredential=)")
            missing.append(
                f"the {name} credential is missing: put {_WHAT[name]} in {' or '.join(places)}"
            )
        else:
            found[name] = value
    if missing:
        raise AdminError(
            ErrorCode.FAILED,
            "; ".join(missing) + " (every node of the cluster reads the same two files)",
        )
    return found[DSN_CREDENTIAL], found[CLUSTER_KEY_CREDENTIAL]
