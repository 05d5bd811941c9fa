"""How a secret is shown: never whole, and never more than 40% of a short one."""

from __future__ import annotations

from collections.abc import Iterable

# What replaces a secret found inside a text (an error message, a provider's reply).
REDACTED = "***"
# Shorter values are too likely to be ordinary words to replace everywhere they occur.
MIN_REDACTED_LENGTH = 8


def glimpse(secret: str) -> str:
    """At most the first and last 4 characters of `secret`, joined by an ellipsis."""
    n = len(secret)
    k = min(4, n // 5)  # never reveal more than 40% of a short secret
    return f"{secret[:k]}…{secret[n - k :]}" if k else "…"


def mask(secret: str) -> str:
    """A secret for display: its glimpse plus its length."""
    return f"{glimpse(secret)} ({len(secret)} chars)"


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret (of a useful length) replaced."""
    for value in secrets:
        if value and len(value) >= MIN_REDACTED_LENGTH:
            text = text.replace(value, REDACTED)
    return text
