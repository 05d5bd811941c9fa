"""The one rule for a rate or budget limit (rpm, concurrency, tokens per day)."""

from __future__ import annotations

MAX_LIMIT = 1_000_000_000  # larger limits are typing mistakes, not policies


def check_limit(
    value: object, label: str = "the limit", error: type[Exception] = ValueError
) -> int | None:
    """None (no limit of its own), or `value` if it is a whole number from 1 to MAX_LIMIT.

    Anything else raises `error` with a message that starts with `label`, so each
    caller raises its own kind of error (a config key, a registry field, a CLI option).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        got = f", not {value}" if isinstance(value, int) and not isinstance(value, bool) else ""
        raise error(f"{label} must be a whole number from 1 to {MAX_LIMIT}{got}")
    return value
