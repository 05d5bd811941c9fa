"""structlog set-up: readable on a terminal, JSON for shippers, priority-prefixed under systemd."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# syslog priorities, which journald reads from a "<N>" prefix on stderr lines.
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def under_journald(stream: TextIO) -> bool:
    """True when `stream` is the very socket systemd connected to the journal."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def _priority_prefix(_: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["_priority"] = _PRIORITY.get(method, 6)
    return event


def _journal_line(_: Any, __: str, event: dict[str, Any]) -> str:
    priority = event.pop("_priority", 6)
    text = structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True)(
        None, "", event
    )
    return f"<{priority}>{text}"


def resolve_format(fmt: str, stream: TextIO) -> str:
    if fmt != "auto":
        return fmt
    if under_journald(stream):
        return "journal"
    return "console" if stream.isatty() else "json"


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> str:
    """Configure structlog for the process; returns the format chosen."""
    out = stream or sys.stderr
    chosen = resolve_format(fmt, out)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    renderer: list[Any]
    if chosen == "journal":
        # journald stamps time itself.
        renderer = [_priority_prefix, structlog.processors.format_exc_info, _journal_line]
    elif chosen == "json":
        renderer = [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(colors=out.isatty()),
        ]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    return chosen
