"""Durations as people type them: ``30m``, ``12h``, ``90d``, ``6w``, ``1y``."""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+)\s*([mhdwy])\s*$")
_UNIT_SECONDS = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def parse_duration(text: str) -> int:
    """Parse ``30m``, ``12h``, ``90d``, ``6w`` or ``1y`` into seconds (m = minutes)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(
            f"invalid duration {text!r}: use a number and a unit, one of m (minutes), "
            "h, d, w, y — e.g. 30m, 12h, 90d, 6w, 1y"
        )
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: it must be longer than zero")
    return seconds
