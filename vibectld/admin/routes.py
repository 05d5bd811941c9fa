"""The admin route table: operation → handler and permission, in one sorted place.

Each handler receives the caller (already authorized by the server for write
operations) and the request's args, and returns a JSON-ready result.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from vibectl.proxy_url import ProxyURL
from vibectld.admin.protocol import ErrorCode, parse_duration
from vibectld.admin.server import AdminError, Caller, Route
from vibectld.reloader import ReloadRejected
from vibectld.runtime import Runtime
from vibectld.store.registry import (
    AlreadyRevoked,
    ClientNotFound,
    ClientRecord,
    DuplicateClient,
    RegistryError,
)
from vibectld.version import __version__


def utc_day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def iso(ts: int | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    }


def _opt_count(args: dict[str, Any], key: str) -> int | None:
    value = args.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AdminError(ErrorCode.BAD_REQUEST, f"{key} must be a whole number of at least 1")
    return value


def _opt_text(args: dict[str, Any], key: str, limit: int = 500) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise AdminError(ErrorCode.BAD_REQUEST, f"{key} must be text of at most {limit} characters")
    return value


def _required_text(args: dict[str, Any], key: str) -> str:
    value = _opt_text(args, key, 200)
    if not value:
        raise AdminError(ErrorCode.BAD_REQUEST, f"'{key}' is required")
    return value


def _models(rt: Runtime, value: Any) -> tuple[str, ...] | None:
    """A client's model allow-list, checked against the catalogue and resolved to model ids."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise AdminError(ErrorCode.BAD_REQUEST, "models must be a list of model names")
    unknown = [m for m in value if not rt.catalogue.has(m)]
    if unknown:
        offered = ", ".join(e.model_id for e in rt.catalogue.entries()) or "none"
        raise AdminError(
            ErrorCode.BAD_REQUEST,
            f"unknown model(s): {', '.join(unknown)}; this server offers: {offered}",
        )
    return tuple(sorted({rt.catalogue.resolve(m).model_id for m in value}))


def _since(args: dict[str, Any], default: str) -> int:
    """The start of a --since window as unix seconds."""
    text = args.get("since") or default
    if not isinstance(text, str):
        raise AdminError(ErrorCode.BAD_REQUEST, "since must be a duration such as 7d")
    try:
        seconds = parse_duration(text)
    except ValueError as e:
        raise AdminError(ErrorCode.BAD_REQUEST, str(e)) from None
    # Longer ago than the epoch means "everything".
    return max(0, int(time.time()) - seconds)


def _who(caller: Caller) -> str:
    return f"{caller.user} (uid {caller.uid})"


def _named(rt: Runtime, per_client: Mapping[str, int]) -> dict[str, int]:
    named: dict[str, int] = {}
    for client_id, count in per_client.items():
        record = rt.registry.get(client_id)
        name = record.name if record else client_id
        named[name] = named.get(name, 0) + count
    return named


def public_endpoint(rt: Runtime) -> tuple[str, int]:
    """The host and port clients should dial, as written into issued URLs."""
    server = rt.config.server
    # A wildcard bind address is no address a client can dial: use the machine's name.
    host = server.public_host or rt.dialable_host() or socket.getfqdn()
    return host, server.public_port or rt.grpc_port


def build_routes(
    rt: Runtime,
    reload: Callable[[], Awaitable[list[str]]],
    request_reload: Callable[[], None],
) -> dict[str, Route]:
    """The route table, bound to the daemon's runtime and its reload entry points."""

    async def issue_client(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        config = rt.config
        name = _required_text(args, "name")
        expires = args.get("expires")
        try:
            lifetime = (
                parse_duration(expires)
                if isinstance(expires, str)
                else config.clients.default_expiry_seconds
            )
        except ValueError as e:
            raise AdminError(ErrorCode.BAD_REQUEST, str(e)) from None
        if expires is not None and not isinstance(expires, str):
            raise AdminError(ErrorCode.BAD_REQUEST, "expires must be a duration such as 90d")
        if lifetime > config.clients.max_expiry_seconds:
            days = config.clients.max_expiry_seconds // 86400
            raise AdminError(
                ErrorCode.BAD_REQUEST,
                f"--expires {expires} is longer than this server allows ({days} days, "
                "clients.max_expiry); choose a shorter expiry",
            )
        models = _models(rt, args.get("models"))
        now = int(time.time())
        try:
            # The registry commits (and fsyncs) before it answers: off the event loop.
            record = await asyncio.to_thread(
                rt.registry.issue,
                name=name,
                expires_at=now + lifetime,
                issued_by=_who(caller),
                note=_opt_text(args, "note"),
                models=models,
                rpm=_opt_count(args, "rpm"),
                concurrency=_opt_count(args, "concurrency"),
                tokens_per_day=_opt_count(args, "tokens_per_day"),
                now=now,
            )
        except DuplicateClient as e:
            raise AdminError(ErrorCode.CONFLICT, str(e)) from None
        except RegistryError as e:
            raise AdminError(ErrorCode.BAD_REQUEST, str(e)) from None
        clients = config.clients
        secret = rt.signing.sign(
            sub=record.name,
            jti=record.id,
            iat=now,
            exp=record.expires_at,
            iss=clients.issuer,
            aud=clients.audience,
        )
        host, port = public_endpoint(rt)
        url = ProxyURL(host, port, secret=secret, ca_sha256=rt.tls.ca_sha256).format()
        return {
            "url": url,
            "id": record.id,
            "name": record.name,
            "expires_at": iso(record.expires_at),
        }

    async def list_clients(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        now = int(time.time())
        records = rt.registry.clients(include_inactive=bool(args.get("all")), now=now)
        return {"clients": [_client_json(r, now) for r in records]}

    async def revoke_client(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        target = _required_text(args, "target")
        try:
            record = await asyncio.to_thread(
                rt.registry.revoke, target, by=_who(caller), reason=_opt_text(args, "reason")
            )
        except ClientNotFound as e:
            raise AdminError(ErrorCode.NOT_FOUND, str(e)) from None
        except RegistryError as e:
            raise AdminError(ErrorCode.FAILED, str(e)) from None
        cancelled = rt.inflight.cancel_client(record.id)
        return {
            "id": record.id,
            "name": record.name,
            "revoked_at": iso(record.revoked_at),
            "cancelled_calls": cancelled,
        }

    async def update_client(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        target = _required_text(args, "target")
        changes: dict[str, Any] = {}
        if "models" in args:
            changes["models"] = _models(rt, args["models"])
        for key in ("rpm", "concurrency", "tokens_per_day"):
            if key in args:
                changes[key] = _opt_count(args, key)
        if "note" in args:
            changes["note"] = _opt_text(args, "note")
        if not changes:
            raise AdminError(ErrorCode.BAD_REQUEST, "nothing to change: give at least one option")
        try:
            record = await asyncio.to_thread(rt.registry.update, target, by=_who(caller), **changes)
        except ClientNotFound as e:
            raise AdminError(ErrorCode.NOT_FOUND, str(e)) from None
        except AlreadyRevoked as e:
            raise AdminError(ErrorCode.FAILED, str(e)) from None
        except RegistryError as e:
            raise AdminError(ErrorCode.BAD_REQUEST, str(e)) from None
        return _client_json(record, int(time.time()))

    async def usage(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        # Without --since: today (UTC) only.
        since = _since(args, "1d") if args.get("since") else int(time.time())
        name = _opt_text(args, "name", 200)
        try:
            rows = await asyncio.to_thread(
                rt.registry.usage, since_day=utc_day(since), name_or_id=name
            )
        except ClientNotFound as e:
            raise AdminError(ErrorCode.NOT_FOUND, str(e)) from None
        except RegistryError as e:
            raise AdminError(ErrorCode.FAILED, str(e)) from None
        return {
            "since": utc_day(since),
            "usage": [
                {
                    "id": r.client_id,
                    "name": r.name,
                    "requests": r.requests,
                    "errors": r.errors,
                    "input_tokens": r.input_tokens,
                    "output_tokens": r.output_tokens,
                    "cost_usd": round(r.cost_usd, 6),
                }
                for r in rows
            ],
        }

    async def audit(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        entries = await asyncio.to_thread(rt.registry.audit, since=_since(args, "7d"))
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

    async def show_ca(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        ca = rt.tls.ca_pem
        return {"pem": ca.decode() if ca else None, "sha256": rt.tls.ca_sha256}

    async def status(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": int(time.time() - rt.started_at),
            "listeners": {"grpc": rt.grpc_address, "admin": str(rt.config.admin.socket)},
            "default_model": rt.catalogue.default,
            "models": [e.model_id for e in rt.catalogue.entries()],
            "clients": rt.registry.counts(),
            "in_flight": rt.inflight.total(),
            "in_flight_by_client": _named(rt, rt.inflight.per_client()),
            "top_today": [
                {"name": r.name, "requests": r.requests, "tokens": r.input_tokens + r.output_tokens}
                for r in rt.registry.top_today(int(time.time()))
            ],
        }

    async def reload_config(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
        if not args.get("wait"):
            request_reload()
            return {"accepted": True}
        try:
            notes = await reload()
        except ReloadRejected as e:
            raise AdminError(
                ErrorCode.FAILED, f"new configuration rejected, the old one keeps serving: {e}"
            ) from None
        return {"reloaded": True, "restart_needed": notes}

    routes = {
        "issue_client": Route(issue_client, write=True, summary="issue a client secret"),
        "audit": Route(audit, write=False, summary="list audited admin changes"),
        "list_clients": Route(list_clients, write=False, summary="list client secrets"),
        "update_client": Route(update_client, write=True, summary="change a client's limits"),
        "usage": Route(usage, write=False, summary="requests, tokens and cost per client"),
        "reload": Route(reload_config, write=True, summary="reload the configuration"),
        "revoke_client": Route(revoke_client, write=True, summary="revoke a client secret"),
        "show_ca": Route(show_ca, write=False, summary="the CA clients must trust"),
        "status": Route(status, write=False, summary="daemon status"),
    }
    return dict(sorted(routes.items()))
