"""The signing-key operations: list, rotate and retire the keys that sign client secrets.

Registered in the one route table (routes.py imports this module); a retired key's
clients have their calls ended at once, as revoke_client does.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from vibectl.util.timefmt import iso
from vibectld.admin.route_args import bad_request, required_text, who
from vibectld.admin.routes import AdminContext, route
from vibectld.admin.server import Caller
from vibectld.pki.signing import KID_RULE, SigningKeys, is_kid


def _signing_key_json(
    signing: SigningKeys, kid: str, active: dict[str | None, int]
) -> dict[str, Any]:
    return {
        "kid": kid,
        "created_at": iso(signing.created_at(kid)),
        "current": kid == signing.active_kid,
        "retired": not signing.verifies(kid),
        "active_clients": active.get(kid, 0),
    }


@route("list_signing_keys", write=False)
async def list_signing_keys(
    ctx: AdminContext, caller: Caller, args: dict[str, Any]
) -> dict[str, Any]:
    signing = ctx.rt.signing
    active = ctx.rt.registry.active_by_kid()
    kids = sorted({*signing.kids, *signing.retired_kids})
    return {
        "keys": [_signing_key_json(signing, kid, active) for kid in kids],
        # Clients issued before the registry recorded kids: their key is not known.
        "unknown_kid_clients": active.get(None, 0),
    }


@route("retire_signing_key", write=True)
async def retire_signing_key(
    ctx: AdminContext, caller: Caller, args: dict[str, Any]
) -> dict[str, Any]:
    rt = ctx.rt
    kid = required_text(args, "target")
    if not is_kid(kid):
        raise bad_request(f"{kid!r} is not a kid; {KID_RULE}")
    # Moves the key file and fsyncs: off the event loop. Verification reads the
    # key set on every request, so the next request signed by `kid` is refused.
    await asyncio.to_thread(rt.signing.retire, kid)
    clients = rt.registry.active_signed_by(kid)
    # Calls already running for those clients end now, as for revoke_client.
    cancelled = sum(rt.inflight.cancel_client(record.id) for record in clients)
    structlog.get_logger("vibectld.audit").info(
        "signing_key.retired",
        audit=True,
        kid=kid,
        by=who(caller),
        active_clients=len(clients),
        cancelled_calls=cancelled,
    )
    return {
        "kid": kid,
        "active_clients": len(clients),
        "cancelled_calls": cancelled,
        "unknown_kid_clients": rt.registry.active_by_kid().get(None, 0),
    }


@route("rotate_signing_key", write=True)
async def rotate_signing_key(
    ctx: AdminContext, caller: Caller, args: dict[str, Any]
) -> dict[str, Any]:
    signing = ctx.rt.signing
    previous = signing.active_kid
    # Writes and fsyncs the new key file: off the event loop.
    kid = await asyncio.to_thread(signing.rotate)
    # The admin server's audit record has no target for this op: name the new key here.
    structlog.get_logger("vibectld.audit").info(
        "signing_key.rotated", audit=True, kid=kid, previous=previous, by=who(caller)
    )
    return {"kid": kid, "created_at": iso(signing.created_at(kid)), "previous": previous}
