"""Usage accounting per client per UTC day: totals in memory, deltas to the registry in batches.

`UsageBook` is the in-memory half. It keeps, for every (client, day) it has seen, the
day's totals (what `tokens_used` and `top_today` read, in O(1) and without SQL) and,
separately, the increments not yet written (the deltas). A flush hands the deltas over
(`take_deltas`) and, once they are committed, forgets them; if the write fails they are
merged back (`restore_deltas`), so a failed flush loses nothing and a repeated flush
never counts twice. Writing increments rather than absolute totals keeps the database
right even for a day whose earlier totals memory never loaded.

The book also counts the secrets the server's redaction policy found in each client's
prompts, per UTC day and detector kind (`record_redactions`), as increments only:
nothing on the request path reads them, and `vibectl-admin usage` reads the table.

The book is not thread-safe: the Registry calls it under its lock.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

from vibectl.util.timefmt import utc_day

DAY_SECONDS = 86400
_EPOCH = date(1970, 1, 1).toordinal()
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")

# Days are counted as whole UTC days since the epoch in memory, and written as YYYY-MM-DD.
Key = tuple[str, int]  # (client id, day number)

# The tables of schema version 2 (migrations.MIGRATIONS); never edit once shipped.
SCHEMA_V2 = (
    """
    CREATE TABLE usage (
        client_id TEXT NOT NULL,
        day TEXT NOT NULL,  -- the UTC day, YYYY-MM-DD
        requests INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (client_id, day)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX usage_day ON usage (day)",
)

# Schema version 5: secrets found in prompts (replaced, or the call refused) per kind.
SCHEMA_V5 = (
    """
    CREATE TABLE redactions (
        client_id TEXT NOT NULL,
        day TEXT NOT NULL,  -- the UTC day, YYYY-MM-DD
        kind TEXT NOT NULL,  -- a detector (vibectl.redaction.KINDS) or a custom rule's name
        count INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (client_id, day, kind)
    ) WITHOUT ROWID
    """,
    "CREATE INDEX redactions_day ON redactions (day)",
)

# Increments, which add up whichever node (or flush) writes them. The old values are
# qualified with the table's name: PostgreSQL calls a bare column ambiguous there.
REDACTIONS_UPSERT_SQL = (
    "INSERT INTO redactions (client_id, day, kind, count) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (client_id, day, kind) DO UPDATE SET "
    "count = redactions.count + excluded.count"
)

UPSERT_SQL = (
    "INSERT INTO usage (client_id, day, requests, errors, input_tokens, output_tokens, "
    "cost_usd) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (client_id, day) DO UPDATE SET "
    "requests = usage.requests + excluded.requests, "
    "errors = usage.errors + excluded.errors, "
    "input_tokens = usage.input_tokens + excluded.input_tokens, "
    "output_tokens = usage.output_tokens + excluded.output_tokens, "
    "cost_usd = usage.cost_usd + excluded.cost_usd"
)

LOAD_DAY_SQL = (
    "SELECT client_id, day, requests, errors, input_tokens, output_tokens, cost_usd "
    "FROM usage WHERE day = ?"
)


def _since_where(n_ids: int | None) -> str:
    """Days >= ?, and with `n_ids` the client ids IN that many placeholders."""
    if n_ids is None:
        return "day >= ?"
    return f"day >= ? AND client_id IN ({', '.join('?' * n_ids)})"


def select_totals_sql(n_ids: int | None) -> str:
    """Per-client sums over days >= ?; restricted to `n_ids` client ids when given."""
    where = _since_where(n_ids)
    return (
        "SELECT client_id, SUM(requests), SUM(errors), SUM(input_tokens), "  # noqa: S608
        f"SUM(output_tokens), SUM(cost_usd) FROM usage WHERE {where} GROUP BY client_id"
    )


def select_redactions_sql(n_ids: int | None) -> str:
    """Per-client, per-kind sums of redactions over days >= ? (and `n_ids` ids if given)."""
    where = _since_where(n_ids)
    return (
        "SELECT client_id, kind, SUM(count) FROM redactions "  # noqa: S608
        f"WHERE {where} GROUP BY client_id, kind"
    )


@dataclass(frozen=True)
class UsageRow:
    """One client's usage over a span of days (or today)."""

    client_id: str
    name: str
    requests: int  # every call served to the client, failed ones included
    errors: int  # the calls among `requests` that ended in an error
    input_tokens: int
    output_tokens: int
    cost_usd: float  # 0.0 where no price is configured
    # Secrets the server found in the client's prompts, per kind (redacted or refused).
    redactions: Mapping[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Counts:
    requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def add(self, other: Counts) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cost_usd += other.cost_usd

    def row(
        self, client_id: str, name: str, redactions: Mapping[str, int] | None = None
    ) -> UsageRow:
        return UsageRow(
            client_id=client_id,
            name=name,
            requests=self.requests,
            errors=self.errors,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cost_usd=self.cost_usd,
            redactions=dict(redactions or {}),
        )


def rows_of(
    totals: Iterable[Sequence[Any]],
    redactions: Iterable[Sequence[Any]],
    always: Iterable[str] = (),
) -> list[UsageRow]:
    """Rows (named by client id) from select_totals_sql's and select_redactions_sql's
    results, plus a row of zeros for each id in `always` that has none."""
    counts = {
        cid: Counts(int(req), int(err), int(tin), int(tout), float(cost))
        for cid, req, err, tin, tout, cost in totals
    }
    kinds: dict[str, dict[str, int]] = {}
    for client_id, kind, n in redactions:
        kinds.setdefault(client_id, {})[kind] = int(n)
        # A client whose every call was refused for its secrets has no other usage.
        counts.setdefault(client_id, Counts())
    for client_id in always:
        counts.setdefault(client_id, Counts())
    return [c.row(cid, cid, kinds.get(cid)) for cid, c in counts.items()]


def day_number(now: int) -> int:
    return now // DAY_SECONDS


def day_text(number: int) -> str:
    return date.fromordinal(_EPOCH + number).isoformat()


def parse_day(text: str) -> int:
    """The day number of a YYYY-MM-DD date; ValueError if it is not one."""
    if not _DAY.fullmatch(text):
        raise ValueError(text)
    return date.fromisoformat(text).toordinal() - _EPOCH


def day_of(now: int) -> str:
    """The UTC day of a unix time, as YYYY-MM-DD (the `day` column)."""
    return utc_day(now)


def sort_rows(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """Most expensive first, then the busiest; name and id make the order total."""
    return sorted(rows, key=lambda r: (-r.cost_usd, -r.requests, r.name, r.client_id))


class UsageBook:
    def __init__(self) -> None:
        # day number -> client id -> the day's totals: a day is replaced as one dict.
        self._totals: dict[int, dict[str, Counts]] = {}
        self._deltas: dict[Key, Counts] = {}
        self._redactions: dict[tuple[str, int, str], int] = {}  # increments, as _deltas
        self._latest_day = 0  # the newest day seen, for pruning

    def load(self, rows: Iterable[Sequence[Any]], now: int) -> None:
        """Take the persisted totals of the rows (LOAD_DAY_SQL's columns) as memory's."""
        self._latest_day = max(self._latest_day, day_number(now))
        for client_id, day, requests, errors, tokens_in, tokens_out, cost in rows:
            counts = Counts(requests, errors, tokens_in, tokens_out, cost)
            self._totals.setdefault(parse_day(day), {})[client_id] = counts

    @property
    def latest_day(self) -> int:
        """The newest day number loaded or counted."""
        return self._latest_day

    def replace_day(self, day: int, fresh: dict[str, Counts]) -> dict[str, Counts] | None:
        """Make `fresh` (`day_of_rows`: the database's totals of day number `day`, every
        node's flushed counts) plus this book's increments not yet written memory's totals
        of that day. Takes `fresh` over, and returns the day's old totals for the caller
        to drop after the lock (freeing them is O(clients)). O(increments): the request
        path waits on it.

        Right only while no flush runs (the Registry holds its _db_lock): the increments
        a flush has taken are then either written (in `fresh`) or put back (in _deltas).
        """
        self._latest_day = max(self._latest_day, day)
        for (client_id, number), counts in self._deltas.items():
            if number == day:
                fresh.setdefault(client_id, Counts()).add(counts)
        old, self._totals[day] = self._totals.get(day), fresh
        return old

    def unwritten_costs(self) -> list[tuple[str, int, float]]:
        """(client id, day number, dollars) of the increments not yet written."""
        return [(cid, day, c.cost_usd) for (cid, day), c in self._deltas.items() if c.cost_usd]

    def record(self, client_id: str, now: int, call: Counts) -> None:
        """Add a call's counts (see `call_counts`) to the client's UTC day of `now`."""
        number = day_number(now)
        self._latest_day = max(self._latest_day, number)
        self._totals.setdefault(number, {}).setdefault(client_id, Counts()).add(call)
        self._deltas.setdefault((client_id, number), Counts()).add(call)

    def record_redactions(self, client_id: str, now: int, found: Mapping[str, int]) -> None:
        """Add the secrets found in one call's prompt, per kind, to the client's UTC day."""
        number = day_number(now)
        for kind, n in found.items():
            key = (client_id, number, kind)
            self._redactions[key] = self._redactions.get(key, 0) + n

    def take_redactions(self) -> dict[tuple[str, int, str], int]:
        """Hand over the unwritten redaction counts, as `take_deltas`."""
        taken, self._redactions = self._redactions, {}
        return taken

    def restore_redactions(self, taken: dict[tuple[str, int, str], int]) -> None:
        for key, n in taken.items():
            self._redactions[key] = self._redactions.get(key, 0) + n

    def tokens_used(self, client_id: str, now: int) -> int:
        counts = self._totals.get(day_number(now), {}).get(client_id)
        return 0 if counts is None else counts.input_tokens + counts.output_tokens

    def day_totals(self, now: int) -> list[tuple[str, Counts]]:
        """Copies of every client's totals for the UTC day of `now`."""
        number = day_number(now)
        return [
            (client_id, Counts(**asdict(counts)))
            for client_id, counts in self._totals.get(number, {}).items()
        ]

    @property
    def dirty(self) -> bool:
        return bool(self._deltas or self._redactions)

    def take_deltas(self) -> dict[Key, Counts]:
        """Hand over the unwritten increments; memory forgets them until `restore_deltas`."""
        deltas, self._deltas = self._deltas, {}
        return deltas

    def restore_deltas(self, deltas: dict[Key, Counts]) -> None:
        """Put back increments whose write failed, merged with any counted since."""
        for key, counts in deltas.items():
            self._deltas.setdefault(key, Counts()).add(counts)

    def prune(self) -> None:
        """Forget the totals of days before yesterday (they are on disk; nothing reads them)."""
        oldest = self._latest_day - 1
        for day in [d for d in self._totals if d < oldest]:
            # A day with increments still to write keeps those clients' totals.
            kept = {c: n for c, n in self._totals[day].items() if (c, day) in self._deltas}
            if kept:
                self._totals[day] = kept
            else:
                del self._totals[day]


def day_of_rows(rows: Iterable[Sequence[Any]]) -> dict[str, Counts]:
    """LOAD_DAY_SQL's rows of one day as client id -> totals, for `replace_day` (built
    outside the registry's lock: it is O(clients))."""
    return {
        client_id: Counts(int(req), int(err), int(tin), int(tout), float(cost))
        for client_id, _, req, err, tin, tout, cost in rows
    }


def delta_rows(deltas: dict[Key, Counts]) -> list[tuple[Any, ...]]:
    """UPSERT_SQL parameters for the deltas."""
    return [
        (
            client_id,
            day_text(number),
            c.requests,
            c.errors,
            c.input_tokens,
            c.output_tokens,
            c.cost_usd,
        )
        for (client_id, number), c in deltas.items()
    ]


def redaction_rows(taken: dict[tuple[str, int, str], int]) -> list[tuple[Any, ...]]:
    """REDACTIONS_UPSERT_SQL parameters for the counts `take_redactions` handed over."""
    return [(cid, day_text(number), kind, n) for (cid, number, kind), n in taken.items()]


def call_counts(
    error: bool, input_tokens: int | None, output_tokens: int | None, cost_usd: float | None
) -> Counts:
    """One served call's counts; missing, negative or non-finite numbers count as 0."""
    return Counts(
        requests=1,
        errors=1 if error else 0,
        input_tokens=_count(input_tokens),
        output_tokens=_count(output_tokens),
        cost_usd=_cost(cost_usd),
    )


def _count(value: int | None) -> int:
    # The hot path never raises over a provider's odd usage report: it counts nothing.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return 0
    return value


def _cost(value: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0.0
    if not math.isfinite(value) or value < 0:
        return 0.0
    return float(value)
