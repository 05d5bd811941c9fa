"""What the admin handlers read from a request: its arguments, each checked with a
message that says what to send instead (BAD_REQUEST, exit 2), and its caller's name as
the registry records it.
"""

from __future__ import annotations

import time
from typing import Any

from vibectl.util.durations import parse_duration
from vibectld.admin.protocol import ErrorCode
from vibectld.admin.server import AdminError, Caller
from vibectld.config import ClientsConfig
from vibectld.generation import Generation


def bad_request(message: str) -> AdminError:
    return AdminError(ErrorCode.BAD_REQUEST, message)


def opt_text(args: dict[str, Any], key: str, limit: int = 500) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise bad_request(f"{key} must be text of at most {limit} characters")
    return value


def required_text(args: dict[str, Any], key: str) -> str:
    value = opt_text(args, key, 200)
    if not value:
        raise bad_request(f"'{key}' is required")
    return value


def duration_arg(text: object, what: str) -> int:
    if not isinstance(text, str):
        raise bad_request(f"{what} must be a duration such as 90d")
    try:
        return parse_duration(text)
    except ValueError as e:
        raise bad_request(str(e)) from None


def since_time(args: dict[str, Any], default: str) -> int:
    """The start of a --since window as unix seconds."""
    seconds = duration_arg(args.get("since") or default, "since")
    # Longer ago than the epoch means "everything".
    return max(0, int(time.time()) - seconds)


def client_lifetime(clients: ClientsConfig, expires: object) -> int:
    if expires is None:
        return clients.default_expiry_seconds
    lifetime = duration_arg(expires, "expires")
    if lifetime > clients.max_expiry_seconds:
        days = clients.max_expiry_seconds // 86400
        raise bad_request(
            f"--expires {expires} is longer than this server allows ({days} days, "
            "clients.max_expiry); choose a shorter expiry"
        )
    return lifetime


def allowed_models(gen: Generation, value: Any) -> tuple[str, ...] | None:
    """A client's model allow-list, checked against the catalogue and resolved to model ids."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise bad_request("models must be a list of model names")
    catalogue = gen.catalogue
    unknown = [m for m in value if not catalogue.has(m)]
    if unknown:
        offered = ", ".join(e.model_id for e in catalogue.entries()) or "none"
        raise bad_request(f"unknown model(s): {', '.join(unknown)}; this server offers: {offered}")
    return tuple(sorted({catalogue.resolve(m).model_id for m in value}))


def who(caller: Caller) -> str:
    return f"{caller.user} (uid {caller.uid})"
