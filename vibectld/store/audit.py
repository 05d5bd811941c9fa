"""The registry's audit table: one row per admin change, committed before the change is answered.

Callers pass names, ids and short texts, never a secret; as a second line of defence
anything shaped like a client secret (a JWT, a connection URL's secret, a bearer
header) is redacted before it is stored, and a target too long to be a name or id is
not stored at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

MAX_TARGET = 64  # a name or id is never longer (see records.NAME_RULE)
MAX_DETAIL = 1000
TOO_LONG_TARGET = "(a value too long to be a name or id)"

# The table of schema version 2 (migrations.MIGRATIONS); never edit once shipped.
SCHEMA_V2 = (
    """
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        caller_uid INTEGER,
        caller_user TEXT NOT NULL,
        op TEXT NOT NULL,
        target TEXT,
        outcome TEXT NOT NULL,
        detail TEXT
    )
    """,
    "CREATE INDEX audit_at ON audit (at)",
)

INSERT_SQL = (
    "INSERT INTO audit (at, caller_uid, caller_user, op, target, outcome, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
# The newest `limit` rows since a time; the caller reverses them to oldest first.
SELECT_SQL = (
    "SELECT id, at, caller_uid, caller_user, op, target, outcome, detail FROM audit "
    "WHERE at >= ? ORDER BY id DESC LIMIT ?"
)

_SECRETS = (
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*"), "[redacted]"),
    (re.compile(r"(vibectl-server(?:-insecure)?://)[^@\s/]+@"), r"\1[redacted]@"),
    (re.compile(r"(?i)(bearer\s+)\S+"), r"\1[redacted]"),
)


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: int
    caller_uid: int | None
    caller_user: str
    op: str  # e.g. issue, revoke, update, reload
    target: str | None  # a client name or id, or None
    outcome: str  # e.g. ok, or the error kind
    detail: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scrub(text: str | None, limit: int = MAX_DETAIL) -> str | None:
    if text is None:
        return None
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def scrub_target(target: str | None) -> str | None:
    if target is None:
        return None
    cleaned = scrub(target, limit=10 * MAX_TARGET)
    assert cleaned is not None
    return cleaned if len(cleaned) <= MAX_TARGET else TOO_LONG_TARGET


# A new audit row in INSERT_SQL's order: at, caller_uid, caller_user, op, target, outcome,
# detail.
NewRow = tuple[int, int | None, str, str, str | None, str, str | None]


def insert_row(row: NewRow) -> tuple[Any, ...]:
    """INSERT_SQL's parameters for the row: its texts scrubbed of secrets and cut to size."""
    at, caller_uid, caller_user, op, target, outcome, detail = row
    return (
        at,
        caller_uid,
        scrub(caller_user, MAX_TARGET),
        scrub(op, MAX_TARGET),
        scrub_target(target),
        scrub(outcome, MAX_DETAIL),
        scrub(detail),
    )


def entry(row: Sequence[Any]) -> AuditEntry:
    """The entry of a row of SELECT_SQL, whose columns are AuditEntry's fields in order."""
    return AuditEntry(*row)
