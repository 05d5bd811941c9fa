"""Dollars spent: per client per UTC calendar month, and by the whole server per UTC day.

`SpendBook` is what the dollar budgets read on the request path, in O(1) and without
SQL. It holds running totals only: the per-day `usage` table (usage.py) is the record,
and a start loads the current month's sums from it, so a restart forgets nothing that
was flushed. Every counted call adds its cost here at the same moment it is added to
the day's usage, so the two never disagree.

The book is not thread-safe: the Registry calls it under its lock.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable, Sequence
from typing import Any

DAY_SECONDS = 86400

# Per-client sums over one month's days (day >= first of month, day < first of next).
MONTH_SQL = (
    "SELECT client_id, SUM(cost_usd) FROM usage WHERE day >= ? AND day < ? GROUP BY client_id"
)
# The whole server's sum for one day.
DAY_SQL = "SELECT COALESCE(SUM(cost_usd), 0) FROM usage WHERE day = ?"


def month_number(now: float) -> int:
    """Months since year 0 of the UTC calendar month of `now` (January 2026: 24312)."""
    t = time.gmtime(now)
    return t.tm_year * 12 + t.tm_mon - 1


def month_start(number: int) -> int:
    """The unix time of 00:00 UTC on the first day of month `number`."""
    year, index = divmod(number, 12)
    return calendar.timegm((year, index + 1, 1, 0, 0, 0, 0, 0, 0))


def next_month_start(now: float) -> int:
    """The unix time of the next first of a month, 00:00 UTC, after `now`."""
    return month_start(month_number(now) + 1)


def next_day_start(now: float) -> int:
    """The unix time of the next midnight UTC after `now`."""
    return (int(now) // DAY_SECONDS + 1) * DAY_SECONDS


def month_days(now: float) -> tuple[str, str]:
    """MONTH_SQL's parameters for the month of `now`: its first day and the next month's."""
    number = month_number(now)
    return _day(month_start(number)), _day(month_start(number + 1))


UnwrittenCosts = Iterable[tuple[str, int, float]]


def sums(
    month_before: dict[str, float], day_rows: Iterable[Sequence[Any]]
) -> tuple[dict[str, float], float]:
    """The month's dollars per client and the day's for the server, from the database:
    `month_before` is MONTH_SQL's sums over the month's days before the day, `day_rows`
    usage.LOAD_DAY_SQL's rows of the day (cost last). For `SpendBook.replace`."""
    month = dict(month_before)
    day_total = 0.0
    for row in day_rows:
        client_id, cost = row[0], float(row[-1] or 0.0)
        month[client_id] = month.get(client_id, 0.0) + cost
        day_total += cost
    return month, day_total


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class SpendBook:
    def __init__(self) -> None:
        # month -> client id -> dollars: a month is replaced as one dict.
        self._months: dict[int, dict[str, float]] = {}
        self._days: dict[int, float] = {}  # day number -> dollars, every client
        self._latest_month = 0

    def load(self, month_rows: Iterable[Sequence[Any]], day_total: float, now: float) -> None:
        """Take the persisted sums (MONTH_SQL's rows, DAY_SQL's value) for `now`'s periods."""
        month = month_number(now)
        self._latest_month = max(self._latest_month, month)
        spent = self._months.setdefault(month, {})
        for client_id, total in month_rows:
            spent[client_id] = float(total or 0.0)
        self._days[int(now) // DAY_SECONDS] = float(day_total or 0.0)

    def replace(
        self, day: int, month: dict[str, float], day_total: float, unwritten: UnwrittenCosts
    ) -> dict[str, float] | None:
        """Make the month and the day of day number `day` the database's sums (`sums`
        made them, outside the registry's lock) plus `unwritten`, this node's counts not
        yet flushed: (client id, day number, dollars). Takes `month` over and returns the
        old one, to be dropped after the lock. O(unwritten): the request path waits on it."""
        number = month_number(day * DAY_SECONDS)
        if number > self._latest_month:
            self._start_month(number)
        for client_id, when, cost in unwritten:
            if month_number(when * DAY_SECONDS) == number:
                month[client_id] = month.get(client_id, 0.0) + cost
            if when == day:
                day_total += cost
        old, self._months[number] = self._months.get(number), month
        self._days[day] = day_total
        return old

    def record(self, client_id: str, now: float, cost_usd: float) -> None:
        """Add a counted call's cost (finite, 0 or more: usage.call_counts made it so)."""
        if cost_usd <= 0:
            return
        month = month_number(now)
        if month > self._latest_month:
            self._start_month(month)
        spent = self._months.setdefault(month, {})
        spent[client_id] = spent.get(client_id, 0.0) + cost_usd
        day = int(now) // DAY_SECONDS
        self._days[day] = self._days.get(day, 0.0) + cost_usd

    def month_spent(self, client_id: str, now: float) -> float:
        """What the client spent in the UTC calendar month of `now`."""
        return self._months.get(month_number(now), {}).get(client_id, 0.0)

    def day_spent(self, now: float) -> float:
        """What every client together spent on the UTC day of `now`."""
        return self._days.get(int(now) // DAY_SECONDS, 0.0)

    def _start_month(self, month: int) -> None:
        # A new month: what is older than the last one is never read again.
        self._latest_month = month
        for old in [m for m in self._months if m < month - 1]:
            del self._months[old]
        oldest_day = month_start(month - 1) // DAY_SECONDS
        for day in [d for d in self._days if d < oldest_day]:
            del self._days[day]
