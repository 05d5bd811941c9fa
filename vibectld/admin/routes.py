"""The admin operations: each a module-level handler declared with its permission.

`ROUTES` is the one table; ``@route(op, write=...)`` registers a handler when this
module is imported, and a duplicate operation name fails the import. A handler gets
the daemon's state (`AdminContext`), the caller (already authorized by the server
for write operations) and the request's args, and returns a JSON-ready result.
Registry failures become admin errors in one place, `admin_error`. The signing-key
operations are routes_signing.py's and storage_migrate is routes_storage.py's, in the same
table; the argument checks they share are route_args.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vibectl.proxy_url import ProxyURL
from vibectl.util.timefmt import iso, utc_day
from vibectld.admin.protocol import ErrorCode
from vibectld.admin.route_args import (
    allowed_models,
    bad_request,
    client_lifetime,
    opt_text,
    required_text,
    since_time,
    who,
)
from vibectld.admin.server import AdminError, Caller, Handler, Route, RouteTable
from vibectld.admin.storage_gate import gate_database, storage_status
from vibectld.generation import Generation, GenerationRejected
from vibectld.pki.signing import SigningKeyError, SigningKeys, UnknownSigningKey
from vibectld.runtime import Runtime
from vibectld.service.budgets import usd_left
from vibectld.service.limits import EffectiveLimits
from vibectld.store.registry import (
    ClientNotFound,
    ClientRecord,
    DuplicateClient,
    InvalidRecord,
    RegistryError,
)
from vibectld.version import __version__


@dataclass(frozen=True)
class AdminContext:
    """What the handlers work on: the daemon's runtime and its reload entry points."""

    rt: Runtime
    # Reload now and return the notes of settings that need a restart; raises if rejected.
    reload: Callable[[], Awaitable[list[str]]]
    # Ask for a reload (as SIGHUP does) and return at once.
    request_reload: Callable[[], None]


ROUTES: RouteTable[AdminContext] = RouteTable()
route = ROUTES.route


Failure = RegistryError | GenerationRejected | SigningKeyError


def admin_error(exc: Failure) -> AdminError:
    """The admin error (and so the vibectl-admin exit code) for a failure below a handler.

    BAD_REQUEST (exit 2) is for input the caller can fix; a registry that cannot be
    written (disk full, locked, read-only) is FAILED (exit 1), whatever the operation,
    and so is a signing key that may not be retired (the current or only one).
    """
    if isinstance(exc, GenerationRejected):
        message = f"new configuration rejected, the old one keeps serving: {exc}"
        return AdminError(ErrorCode.FAILED, message)
    if isinstance(exc, UnknownSigningKey):
        return AdminError(ErrorCode.NOT_FOUND, str(exc))
    if isinstance(exc, SigningKeyError):  # SigningKeyInUse, or a file that cannot move
        return AdminError(ErrorCode.FAILED, str(exc))
    if isinstance(exc, ClientNotFound):
        return AdminError(ErrorCode.NOT_FOUND, str(exc))
    if isinstance(exc, DuplicateClient):
        return AdminError(ErrorCode.CONFLICT, str(exc))
    if isinstance(exc, InvalidRecord):
        return AdminError(ErrorCode.BAD_REQUEST, str(exc))
    # AlreadyRevoked, StorageFailure and anything else the registry could not do.
    return AdminError(ErrorCode.FAILED, str(exc))


def _mapped(handler: Handler) -> Handler:
    async def call(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await handler(caller, args)
        except (RegistryError, GenerationRejected, SigningKeyError) as e:
            raise admin_error(e) from None

    return call


def build_routes(
    rt: Runtime,
    reload: Callable[[], Awaitable[list[str]]],
    request_reload: Callable[[], None],
) -> dict[str, Route]:
    """The route table, bound to the daemon's runtime and its reload entry points; what
    needs the database fails at once while a shared one is away (admin/storage_gate.py)."""
    return gate_database(rt, ROUTES.bind(AdminContext(rt, reload, request_reload), _mapped))


# -- results --------------------------------------------------------------------------


def _client_json(record: ClientRecord, now: int, signing: SigningKeys) -> dict[str, Any]:
    return {
        "id": record.id,
        "name": record.name,
        "status": record.status(now),
        "created_at": iso(record.created_at),
        "expires_at": iso(record.expires_at),
        "last_seen_at": iso(record.last_seen_at),
        "requests": record.requests,
        "revoked_at": iso(record.revoked_at),
        "revoke_reason": record.revoke_reason,
        "issued_by": record.issued_by,
        "note": record.note,
        "models": list(record.models) if record.models is not None else None,
        "rpm": record.rpm,
        "concurrency": record.concurrency,
        "tokens_per_day": record.tokens_per_day,
        "usd_per_month": record.usd_per_month,
        "kid": record.kid,
        # A retired key's secrets are refused whatever the status says (it keeps the
        # contract's three values); null when the registry does not know the key.
        "key_retired": None if record.kid is None else not signing.verifies(record.kid),
    }


def _named(rt: Runtime, per_client: Mapping[str, int]) -> dict[str, int]:
    named: dict[str, int] = {}
    for client_id, count in per_client.items():
        record = rt.registry.get(client_id)
        name = record.name if record else client_id
        named[name] = named.get(name, 0) + count
    return named


def public_endpoint(rt: Runtime, gen: Generation) -> tuple[str, int]:
    """The host and port clients should dial, as written into issued URLs."""
    server = gen.config.server
    # A wildcard bind address is no address a client can dial: use the machine's name.
    host = server.public_host or rt.dialable_host() or socket.getfqdn()
    return host, server.public_port or rt.grpc_port


# -- the operations, sorted by name ------------------------------------------------------


@route("audit", write=False)
async def audit(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    entries = await asyncio.to_thread(ctx.rt.registry.audit, since=since_time(args, "7d"))
    return {
        "entries": [
            {
                "at": iso(e.at),
                "caller_uid": e.caller_uid,
                "caller_user": e.caller_user,
                "op": e.op,
                "target": e.target,
                "outcome": e.outcome,
            }
            for e in entries
        ]
    }


@route("issue_client", write=True)
async def issue_client(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    rt = ctx.rt
    gen = rt.generation  # one configuration for the whole operation
    name = required_text(args, "name")
    lifetime = client_lifetime(gen.config.clients, args.get("expires"))
    now = int(time.time())
    # Read once: the record names the key that signs below, even if a rotation comes
    # in between.
    kid = rt.signing.active_kid
    # The registry commits (and fsyncs) before it answers: off the event loop.
    record = await asyncio.to_thread(
        rt.registry.issue,
        name=name,
        expires_at=now + lifetime,
        issued_by=who(caller),
        note=opt_text(args, "note"),
        models=allowed_models(gen, args.get("models")),
        # The registry checks the limits (InvalidRecord: bad_request) before it writes.
        rpm=args.get("rpm"),
        concurrency=args.get("concurrency"),
        tokens_per_day=args.get("tokens_per_day"),
        usd_per_month=args.get("usd_per_month"),
        kid=kid,
        now=now,
    )
    clients = gen.config.clients
    try:
        secret = rt.signing.sign(
            sub=record.name,
            jti=record.id,
            iat=now,
            exp=record.expires_at,
            iss=clients.issuer,
            aud=clients.audience,
            kid=kid,
        )
    except SigningKeyError as e:
        # Only if `kid` was rotated away and retired while the registry wrote.
        raise AdminError(
            ErrorCode.FAILED,
            f"{e}; revoke the client just recorded (vibectl-admin revoke-client {record.id}) "
            "and issue it again",
        ) from None
    host, port = public_endpoint(rt, gen)
    url = ProxyURL(host, port, secret=secret, ca_sha256=gen.tls.ca_sha256).format()
    return {"url": url, "id": record.id, "name": record.name, "expires_at": iso(record.expires_at)}


@route("list_clients", write=False)
async def list_clients(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    now = int(time.time())
    records = ctx.rt.registry.clients(include_inactive=bool(args.get("all")), now=now)
    return {"clients": [_client_json(r, now, ctx.rt.signing) for r in records]}


@route("reload", write=True)
async def reload(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    if not args.get("wait"):
        ctx.request_reload()
        return {"accepted": True}
    return {"reloaded": True, "restart_needed": await ctx.reload()}


@route("revoke_client", write=True)
async def revoke_client(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    rt = ctx.rt
    target = required_text(args, "target")
    reason = opt_text(args, "reason")
    record = await asyncio.to_thread(rt.registry.revoke, target, by=who(caller), reason=reason)
    return {
        "id": record.id,
        "name": record.name,
        "revoked_at": iso(record.revoked_at),
        "cancelled_calls": rt.inflight.cancel_client(record.id),
    }


@route("show_ca", write=False)
async def show_ca(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    tls = ctx.rt.tls
    return {"pem": tls.ca_pem.decode() if tls.ca_pem else None, "sha256": tls.ca_sha256}


@route("status", write=False)
async def status(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    rt = ctx.rt
    gen = rt.generation
    # With workers the calls run in them; the main process holds a lease for each.
    if rt.workers is not None:
        workers = rt.workers.rows()
        by_client = rt.workers.in_flight_by_client()
    else:
        by_client = rt.inflight.per_client()
        workers = [
            {
                "index": 1,
                "pid": os.getpid(),
                "state": "draining" if rt.draining else "serving",
                "started": iso(int(rt.started_at)),
                "restarts": 0,
                "in_flight": rt.inflight.total(),
            }
        ]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "uptime_seconds": int(time.time() - rt.started_at),
        "listeners": {"grpc": rt.grpc_address, "admin": str(gen.config.admin.socket)},
        "default_model": gen.catalogue.default,
        "models": [e.model_id for e in gen.catalogue.entries()],
        "clients": rt.registry.counts(),
        "in_flight": sum(by_client.values()),
        "in_flight_by_client": _named(rt, by_client),
        "workers": workers,
        "top_today": [
            {"name": r.name, "requests": r.requests, "tokens": r.input_tokens + r.output_tokens}
            for r in rt.registry.top_today(int(time.time()))
        ],
        # The whole server's spend today (UTC) against its cap (null: none).
        "usd_today": round(rt.registry.usd_spent_day(time.time()), 6),
        "server_usd_per_day": gen.config.limits.server_usd_per_day,
        **storage_status(rt),
    }


@route("update_client", write=True)
async def update_client(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    rt = ctx.rt
    target = required_text(args, "target")
    changes: dict[str, Any] = {}
    if "models" in args:
        changes["models"] = allowed_models(rt.generation, args["models"])
    for key in ("rpm", "concurrency", "tokens_per_day", "usd_per_month"):
        if key in args:
            changes[key] = args[key]  # checked by the registry before it writes
    if "note" in args:
        changes["note"] = opt_text(args, "note")
    if not changes:
        raise bad_request("nothing to change: give at least one option")
    record = await asyncio.to_thread(rt.registry.update, target, by=who(caller), **changes)
    return _client_json(record, int(time.time()), rt.signing)


@route("usage", write=False)
async def usage(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    # Without --since: today (UTC) only.
    since = utc_day(since_time(args, "1d") if args.get("since") else time.time())
    name = opt_text(args, "name", 200)
    rows = await asyncio.to_thread(ctx.rt.registry.usage, since_day=since, name_or_id=name)
    return {
        "since": since,
        "usage": [
            {
                "id": r.client_id,
                "name": r.name,
                "requests": r.requests,
                "errors": r.errors,
                "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens,
                "cost_usd": round(r.cost_usd, 6),
                # Secrets the server found in the client's prompts: the total, and per kind.
                "redactions": sum(r.redactions.values()),
                "redaction_kinds": dict(sorted(r.redactions.items())),
                **_budget_json(ctx.rt, r.client_id),
            }
            for r in rows
        ],
    }


def _budget_json(rt: Runtime, client_id: str) -> dict[str, Any]:
    """The client's dollar budget this UTC month and what is left, where it has one."""
    record = rt.registry.get(client_id)
    if record is None:
        return {}
    budget = EffectiveLimits.of(record, rt.config.limits).usd_per_month
    if budget is None:
        return {}
    spent = rt.registry.usd_spent_month(client_id, time.time())
    return {
        "usd_budget": budget,
        "usd_month": round(spent, 6),
        "usd_left": round(usd_left(budget, spent), 6),
    }


# Modules of more operations, registered in ROUTES above when imported (they import it).
from vibectld.admin import routes_signing, routes_storage  # noqa: E402, F401
