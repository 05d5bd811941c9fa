"""The one rule for a rate or budget limit (rpm, concurrency, tokens per day, dollars)."""

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


# A dollar budget is at least a cent and at most a million dollars: below a cent it
# refuses every call, above a million it is a typing mistake, not a policy.
MIN_USD = 0.01
MAX_USD = 1_000_000.0


def check_usd(
    value: object, label: str = "the budget", error: type[Exception] = ValueError
) -> float | None:
    """None (no budget of its own), or `value` as a float if it is a number of US dollars
    from MIN_USD to MAX_USD.

    Anything else (negative, zero, NaN, infinite, text, a bool) raises `error` with a
    message that starts with `label`, as `check_limit` does.
    """
    if value is None:
        return None
    number: float | None = None
    if not isinstance(value, bool) and isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            number = None
    if number is None or not MIN_USD <= number <= MAX_USD:  # NaN fails both comparisons
        got = f", not {value}" if number is not None else ""
        raise error(f"{label} must be a number of US dollars from {MIN_USD} to {MAX_USD:.0f}{got}")
    return number


def format_usd(amount: float) -> str:
    """'$3.20'; under a dollar, four decimals where cents would hide the amount ('$0.0080')."""
    if abs(amount) < 1 and round(amount, 2) != round(amount, 4):
        return f"${amount:.4f}"
    return f"${amount:,.2f}"
