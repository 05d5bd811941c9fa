"""The admin socket's wire protocol, shared by the daemon and vibectl-admin.

Framing: one JSON object per line (UTF-8, ``\\n``-terminated, at most
``MAX_LINE_BYTES``). A client sends requests and reads one response per
request, in order, on the same connection.

Request:  ``{"v": 1, "id": 7, "op": "revoke_client", "args": {...}}``
Response: ``{"v": 1, "id": 7, "ok": true, "result": {...}}`` or
          ``{"v": 1, "id": 7, "ok": false, "error": {"code": "...", "message": "..."}}``

This module must stay importable without any daemon internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# Re-exported for callers that validate durations as the daemon will (config, tests).
from vibectl.util.durations import parse_duration as parse_duration

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 64 * 1024


class ErrorCode:
    """Stable error codes carried in a response's ``error.code``."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    UNSUPPORTED_VERSION = "unsupported_version"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    FAILED = "failed"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Request:
    id: int
    op: str
    args: dict[str, Any]


class WireError(Exception):
    """An error as a response carries it: a stable `code` (ErrorCode) and a `message`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ProtocolError(WireError):
    """A request or response that does not follow this protocol."""


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def encode_request(req: Request) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": req.id, "op": req.op, "args": req.args})


def encode_result(req_id: int | None, result: dict[str, Any]) -> bytes:
    return encode({"v": PROTOCOL_VERSION, "id": req_id, "ok": True, "result": result})


def encode_error(req_id: int | None, code: str, message: str) -> bytes:
    error = {"code": code, "message": message}
    return encode({"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": error})


def decode_request(line: bytes) -> Request:
    """Parse one request line; raise ProtocolError naming what is wrong."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        # ValueError covers bad JSON, bad UTF-8 and integers too long to convert.
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"request is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request must be a JSON object")
    version = obj.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported; this daemon speaks "
            f"v{PROTOCOL_VERSION}: use a vibectl-admin of the same release as vibectld",
        )
    req_id = obj.get("id")
    if not isinstance(req_id, int) or isinstance(req_id, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request 'id' must be an integer")
    op = obj.get("op")
    if not isinstance(op, str) or not op:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request 'op' must be a non-empty string")
    args = obj.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request 'args' must be a JSON object")
    return Request(id=req_id, op=op, args=args)


def decode_response(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(ErrorCode.INTERNAL, f"daemon sent invalid JSON: {e}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("ok"), bool):
        raise ProtocolError(ErrorCode.INTERNAL, "daemon sent a malformed response")
    return obj
