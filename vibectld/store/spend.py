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


def _day(ts: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


class SpendBook:
    def __init__(self) -> None:
        self._months: dict[tuple[str, int], float] = {}  # (client id, month) -> dollars
        self._days: dict[int, float] = {}  # day number -> dollars, every client
        self._latest_month = 0

    def load(self, month_rows: Iterable[Sequence[Any]], day_total: float, now: float) -> None:
        """Take the persisted sums (MONTH_SQL's rows, DAY_SQL's value) for `now`'s periods."""
        month = month_number(now)
        self._latest_month = max(self._latest_month, month)
        for client_id, total in month_rows:
            self._months[(client_id, month)] = float(total or 0.0)
        self._days[int(now) // DAY_SECONDS] = float(day_total or 0.0)

    def replace(
        self,
        day: int,
        month_before: dict[str, float],
        day_rows: Iterable[Sequence[Any]],
        unwritten: Iterable[tuple[str, int, float]],
    ) -> None:
        """Make the month and the day of day number `day` the database's sums plus what
        is not yet written: `month_before` is MONTH_SQL's sums over the month's days
        before `day`, `day_rows` usage.LOAD_DAY_SQL's rows of `day` (cost last), and
        `unwritten` (client id, day number, dollars) this node's counts not yet flushed.
        """
        start = day * DAY_SECONDS
        month = month_number(start)
        if month > self._latest_month:
            self._start_month(month)
        months = dict(month_before)
        day_total = 0.0
        for row in day_rows:
            client_id, cost = row[0], float(row[-1] or 0.0)
            months[client_id] = months.get(client_id, 0.0) + cost
            day_total += cost
        for client_id, number, cost in unwritten:
            if month_number(number * DAY_SECONDS) == month:
                months[client_id] = months.get(client_id, 0.0) + cost
            if number == day:
                day_total += cost
        for key in [k for k in self._months if k[1] == month]:
            del self._months[key]
        for client_id, total in months.items():
            self._months[(client_id, month)] = total
        self._days[day] = day_total

    def record(self, client_id: str, now: float, cost_usd: float) -> None:
        """Add a counted call's cost (finite, 0 or more: usage.call_counts made it so)."""
        if cost_usd <= 0:
            return
        month = month_number(now)
        if month > self._latest_month:
            self._start_month(month)
        key = (client_id, month)
        self._months[key] = self._months.get(key, 0.0) + cost_usd
        day = int(now) // DAY_SECONDS
        self._days[day] = self._days.get(day, 0.0) + cost_usd

    def month_spent(self, client_id: str, now: float) -> float:
        """What the client spent in the UTC calendar month of `now`."""
        return self._months.get((client_id, month_number(now)), 0.0)

    def day_spent(self, now: float) -> float:
        """What every client together spent on the UTC day of `now`."""
        return self._days.get(int(now) // DAY_SECONDS, 0.0)

    def _start_month(self, month: int) -> None:
        # A new month: what is older than the last one is never read again.
        self._latest_month = month
        for key in [k for k in self._months if k[1] < month - 1]:
            del self._months[key]
        oldest_day = month_start(month - 1) // DAY_SECONDS
        for day in [d for d in self._days if d < oldest_day]:
            del self._days[day]
