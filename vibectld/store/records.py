"""The registry's records and their validation: ClientRecord, the rules for names, limits,
models and notes, and the conversion of a record to and from its SQLite row.

vibectld.store.registry is the interface; the schema the rows live in is in
vibectld.store.migrations.
"""

from __future__ import annotations

import enum
import json
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Final

from vibectl.util.limits import MAX_LIMIT as MAX_LIMIT  # re-exported: the registry's rule
from vibectl.util.limits import check_limit, check_usd

NAME_RULE = (
    "a client name is 1 to 64 characters: letters, digits, '.', '_', '@' and '-', "
    "starting with a letter or digit"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_LIST_HINT = "list them with: vibectl-admin list-clients --all"
MAX_NOTE = 1000


class Unset(enum.Enum):
    """The type of UNSET: "leave this field as it is" in `Registry.update`."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET

_COLUMNS = (
    "id, name, created_at, expires_at, issued_by, note, models, rpm, concurrency, "
    "tokens_per_day, revoked_at, revoked_by, revoke_reason, last_seen_at, requests, kid, "
    "usd_per_month"
)


class RegistryError(Exception):
    """A registry operation failed; the message says why and what to do."""


class InvalidRecord(RegistryError):
    """The input is unusable (a bad name, limit, model list or note); nothing was touched."""


class StorageFailure(RegistryError):
    """The database could not be read or written (disk full, locked, read-only, closed)."""


class ClientNotFound(RegistryError):
    pass


class DuplicateClient(RegistryError):
    pass


class AlreadyRevoked(RegistryError):
    pass


@dataclass(frozen=True)
class ClientRecord:
    id: str  # the secret's jti
    name: str
    created_at: int
    expires_at: int
    issued_by: str
    note: str | None = None
    models: tuple[str, ...] | None = None  # None: every model the server allows
    rpm: int | None = None  # None (for each limit): the configured default
    concurrency: int | None = None
    tokens_per_day: int | None = None
    revoked_at: int | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    last_seen_at: int | None = None
    requests: int = 0
    # The kid of the key that signed the secret; None if issued before it was recorded.
    kid: str | None = None
    # Dollars per UTC calendar month; None: the configured default (limits.usd_per_month).
    usd_per_month: float | None = None

    def status(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        return "active"

    def to_dict(self, now: int) -> dict[str, Any]:
        data = asdict(self)
        data["models"] = list(self.models) if self.models is not None else None
        data["status"] = self.status(now)
        return data


def _record(row: Sequence[Any]) -> ClientRecord:
    """The record of a row in _COLUMNS order (the dataclass's field order); see _db_row."""
    values = list(row)
    values[6] = tuple(json.loads(row[6])) if row[6] is not None else None
    return ClientRecord(*values)


def _check_limit(label: str, value: object) -> int | None:
    return check_limit(value, label, InvalidRecord)


def _check_usd(label: str, value: object) -> float | None:
    return check_usd(value, label, InvalidRecord)


def _check_models(models: object) -> tuple[str, ...] | None:
    if models is None:
        return None
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) and m for m in models):
        raise InvalidRecord("models must be a list of non-empty model names")
    if not models:
        raise InvalidRecord(
            "models must name at least one model; leave it out (or clear it) to allow every "
            "model the server offers"
        )
    return tuple(dict.fromkeys(models))  # in order, without repeats


def _check_note(note: object) -> str | None:
    if note is not None and (not isinstance(note, str) or len(note) > MAX_NOTE):
        raise InvalidRecord(f"the note must be a text of at most {MAX_NOTE} characters")
    return note


def check_changes(given: dict[str, object]) -> dict[str, Any]:
    """The fields `Registry.update` was given (not UNSET), each checked as `issue` checks it."""
    changes: dict[str, Any] = {}
    for label, value in given.items():
        if value is UNSET:
            continue
        if label == "models":
            changes[label] = _check_models(value)
        elif label == "usd_per_month":
            changes[label] = _check_usd(label, value)
        elif label == "note":
            changes[label] = _check_note(value)
        else:
            changes[label] = _check_limit(label, value)
    return changes


def _db_row(record: ClientRecord) -> tuple[Any, ...]:
    """The record's values in _COLUMNS order (the dataclass's field order)."""
    values = [getattr(record, f.name) for f in fields(ClientRecord)]
    values[6] = _models_json(record.models)
    return tuple(values)


def _models_json(models: tuple[str, ...] | None) -> str | None:
    return json.dumps(list(models)) if models is not None else None


def _now(now: int | None) -> int:
    return int(time.time()) if now is None else now


def _quote(text: str) -> str:
    # Nothing valid is longer than 64 characters; longer input may be a pasted secret,
    # which must not end up in an error message or the audit log.
    return repr(text) if len(text) <= 64 else "(a value too long to be a name or id)"
