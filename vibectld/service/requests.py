"""What a call's request must be before anything runs for it: the request_id's shape,
the request's size and prompt, its response schema (JSON, not too deep), and the model
the client may use (servicer.py runs these in the contract's order).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from vibectl._proto import llm_proxy_pb2 as pb
from vibectld.generation import Generation
from vibectld.providers.catalogue import CatalogueEntry, UnknownModel
from vibectld.providers.execution import ErrorCode, ModelFailure
from vibectld.service.refusals import InvalidRequest, PermissionDenied
from vibectld.store.registry import ClientRecord

# What a client may send as request_id; anything else is refused before it is logged.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# Deeper schemas are refused: no real response schema comes near it, and code that walks
# a schema recursively (llm, pydantic, provider SDKs) must not meet one it cannot handle.
MAX_SCHEMA_DEPTH = 64


def request_id_of(sent: str) -> str:
    """The client's request_id if it has the allowed shape, a new one if it sent none."""
    if not sent:
        return uuid.uuid4().hex
    if len(sent) > 64 or not _REQUEST_ID.fullmatch(sent):
        # Never quoted back or logged: it is the client's text, and it may be huge.
        raise InvalidRequest(
            "request_id must be at most 64 characters of letters, digits and . _ : - "
            "(or empty, and the server chooses one)"
        )
    return sent


def validate(
    request: pb.ExecuteRequest, max_bytes: int, max_chars: int | None
) -> dict[str, Any] | None:
    """Check the request's size and shape; return its response schema, parsed, if any."""
    size = request.ByteSize()
    if size > max_bytes:
        raise InvalidRequest(
            f"request is {size} bytes; this server accepts at most {max_bytes} "
            "— send a shorter prompt"
        )
    if not any(f.strip() for f in request.user_fragments):
        raise InvalidRequest("request has no prompt: user_fragments is empty")
    has_schema = request.HasField("response_model_schema")
    if max_chars is not None:
        chars = sum(map(len, request.user_fragments)) + sum(map(len, request.system_fragments))
        if has_schema:
            chars += len(request.response_model_schema)
        if chars > max_chars:
            raise InvalidRequest(
                f"input is {chars} characters (prompt, system prompt and response schema); "
                f"this server accepts at most {max_chars} — send a shorter prompt"
            )
    return _schema(request.response_model_schema) if has_schema else None


def _schema(text: str) -> dict[str, Any]:
    try:
        parsed = json.loads(text)
    except RecursionError:  # deeper than Python's own parser goes
        raise _too_deep() from None
    except ValueError as e:  # JSONDecodeError, or a number too long to convert
        raise InvalidRequest(f"response_model_schema is not valid JSON: {e}") from None
    if _deeper_than(parsed, MAX_SCHEMA_DEPTH):
        raise _too_deep()
    if not isinstance(parsed, dict):
        raise InvalidRequest("response_model_schema must be a JSON object (a JSON schema)")
    return parsed


def _too_deep() -> InvalidRequest:
    return InvalidRequest(
        f"response_model_schema is nested more than {MAX_SCHEMA_DEPTH} levels deep; "
        "send a flatter schema (use $defs and $ref for repeated parts)"
    )


def _deeper_than(value: Any, limit: int) -> bool:
    """True when `value` nests objects and arrays more than `limit` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def authorize(
    request: pb.ExecuteRequest, client: ClientRecord, gen: Generation
) -> tuple[CatalogueEntry | None, ModelFailure | None]:
    """The model to run, or an in-band MODEL_NOT_FOUND; raises PermissionDenied.

    A client with an allow-list gets the same refusal for a model the server
    does not have as for one it may not use, and it names no model outside that
    list: the server's other models are not its business. A client without a
    list gets the in-band MODEL_NOT_FOUND that lists what it can use.
    """
    name = request.model_name if request.HasField("model_name") else None
    allowed = client.models
    try:
        entry = gen.catalogue.resolve(name)
    except UnknownModel as e:
        if allowed is None:
            return None, ModelFailure(ErrorCode.MODEL_NOT_FOUND, str(e))
        if name is not None and name in allowed:
            # Its own model, gone from the server (the catalogue changed): say so.
            usable = [m for m in allowed if gen.catalogue.has(m)]
            return None, ModelFailure(
                ErrorCode.MODEL_NOT_FOUND,
                f"model '{name}' is not available on this server now; your models here: "
                f"{', '.join(usable) or 'none'} — ask your vibectld admin",
            )
        raise _not_allowed(client) from None
    assert entry is not None
    if allowed is not None and entry.model_id not in allowed:
        raise _not_allowed(client)
    return entry, None


def _not_allowed(client: ClientRecord) -> PermissionDenied:
    # The same words whatever was asked for, known to the server or not, and no name
    # from outside the client's own list (not even the one it sent).
    assert client.models is not None
    return PermissionDenied(
        f"client '{client.name}' may not use the requested model; allowed: "
        f"{', '.join(client.models) or 'none'} — choose one of those, or ask your vibectld admin"
    )
