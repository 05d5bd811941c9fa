"""Unix times as text, always in UTC."""

from __future__ import annotations

import time


def utc_day(ts: float) -> str:
    """The UTC calendar day of `ts` as ``YYYY-MM-DD``."""
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def iso(ts: float | None) -> str | None:
    """`ts` as ISO 8601 in UTC (``2025-01-31T12:00:00Z``); None stays None."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def readable(ts: float) -> str:
    """`ts` for a sentence a person reads (``2025-01-31 12:00:00 UTC``)."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
