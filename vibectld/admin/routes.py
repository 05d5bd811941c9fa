"""The admin operations: each a module-level handler declared with its permission.

`ROUTES` is the one table; ``@route(op, write=...)`` registers a handler when this
module is imported, and a duplicate operation name fails the import. A handler gets
the daemon's state (`AdminContext`), the caller (already authorized by the server
for write operations) and the request's args, and returns a JSON-ready result.
Registry failures become admin errors in one place, `admin_error`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from vibectl.proxy_url import ProxyURL
from vibectl.util.durations import parse_duration
from vibectl.util.timefmt import iso, utc_day
from vibectld.admin.protocol import ErrorCode
from vibectld.admin.server import AdminError, Caller, Handler, Route, RouteTable
from vibectld.admin.storage_gate import gate_database, storage_status
from vibectld.config import ClientsConfig
from vibectld.generation import Generation, GenerationRejected
from vibectld.pki.signing import (
    KID_RULE,
    SigningKeyError,
    SigningKeys,
    UnknownSigningKey,
    is_kid,
)
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


# -- argument checks ------------------------------------------------------------------


def _bad(message: str) -> AdminError:
    return AdminError(ErrorCode.BAD_REQUEST, message)


def _opt_text(args: dict[str, Any], key: str, limit: int = 500) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise _bad(f"{key} must be text of at most {limit} characters")
    return value


def _required_text(args: dict[str, Any], key: str) -> str:
    value = _opt_text(args, key, 200)
    if not value:
        raise _bad(f"'{key}' is required")
    return value


def _duration(text: object, what: str) -> int:
    if not isinstance(text, str):
        raise _bad(f"{what} must be a duration such as 90d")
    try:
        return parse_duration(text)
    except ValueError as e:
        raise _bad(str(e)) from None


def _since(args: dict[str, Any], default: str) -> int:
    """The start of a --since window as unix seconds."""
    seconds = _duration(args.get("since") or default, "since")
    # Longer ago than the epoch means "everything".
    return max(0, int(time.time()) - seconds)


def _lifetime(clients: ClientsConfig, expires: object) -> int:
    if expires is None:
        return clients.default_expiry_seconds
    lifetime = _duration(expires, "expires")
    if lifetime > clients.max_expiry_seconds:
        days = clients.max_expiry_seconds // 86400
        raise _bad(
            f"--expires {expires} is longer than this server allows ({days} days, "
            "clients.max_expiry); choose a shorter expiry"
        )
    return lifetime


def _models(gen: Generation, value: Any) -> tuple[str, ...] | None:
    """A client's model allow-list, checked against the catalogue and resolved to model ids."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise _bad("models must be a list of model names")
    catalogue = gen.catalogue
    unknown = [m for m in value if not catalogue.has(m)]
    if unknown:
        offered = ", ".join(e.model_id for e in catalogue.entries()) or "none"
        raise _bad(f"unknown model(s): {', '.join(unknown)}; this server offers: {offered}")
    return tuple(sorted({catalogue.resolve(m).model_id for m in value}))


# -- results --------------------------------------------------------------------------


def _client_json(record: ClientRecord, now: int) -> dict[str, Any]:
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
    }


def _who(caller: Caller) -> str:
    return f"{caller.user} (uid {caller.uid})"


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
    entries = await asyncio.to_thread(ctx.rt.registry.audit, since=_since(args, "7d"))
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
    name = _required_text(args, "name")
    lifetime = _lifetime(gen.config.clients, args.get("expires"))
    now = int(time.time())
    # Read once: the record names the key that signs below, even if a rotation comes
    # in between.
    kid = rt.signing.active_kid
    # The registry commits (and fsyncs) before it answers: off the event loop.
    record = await asyncio.to_thread(
        rt.registry.issue,
        name=name,
        expires_at=now + lifetime,
        issued_by=_who(caller),
        note=_opt_text(args, "note"),
        models=_models(gen, args.get("models")),
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
    return {"clients": [_client_json(r, now) for r in records]}


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


@route("reload", write=True)
async def reload(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    if not args.get("wait"):
        ctx.request_reload()
        return {"accepted": True}
    return {"reloaded": True, "restart_needed": await ctx.reload()}


@route("revoke_client", write=True)
async def revoke_client(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    rt = ctx.rt
    target = _required_text(args, "target")
    reason = _opt_text(args, "reason")
    record = await asyncio.to_thread(rt.registry.revoke, target, by=_who(caller), reason=reason)
    return {
        "id": record.id,
        "name": record.name,
        "revoked_at": iso(record.revoked_at),
        "cancelled_calls": rt.inflight.cancel_client(record.id),
    }


@route("retire_signing_key", write=True)
async def retire_signing_key(
    ctx: AdminContext, caller: Caller, args: dict[str, Any]
) -> dict[str, Any]:
    rt = ctx.rt
    kid = _required_text(args, "target")
    if not is_kid(kid):
        raise _bad(f"{kid!r} is not a kid; {KID_RULE}")
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
        by=_who(caller),
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
        "signing_key.rotated", audit=True, kid=kid, previous=previous, by=_who(caller)
    )
    return {"kid": kid, "created_at": iso(signing.created_at(kid)), "previous": previous}


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
    target = _required_text(args, "target")
    changes: dict[str, Any] = {}
    if "models" in args:
        changes["models"] = _models(rt.generation, args["models"])
    for key in ("rpm", "concurrency", "tokens_per_day", "usd_per_month"):
        if key in args:
            changes[key] = args[key]  # checked by the registry before it writes
    if "note" in args:
        changes["note"] = _opt_text(args, "note")
    if not changes:
        raise _bad("nothing to change: give at least one option")
    record = await asyncio.to_thread(rt.registry.update, target, by=_who(caller), **changes)
    return _client_json(record, int(time.time()))


@route("usage", write=False)
async def usage(ctx: AdminContext, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    # Without --since: today (UTC) only.
    since = utc_day(_since(args, "1d") if args.get("since") else time.time())
    name = _opt_text(args, "name", 200)
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
from vibectld.admin import routes_storage  # noqa: E402, F401
