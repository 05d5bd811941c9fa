"""structlog set-up: readable on a terminal, JSON for shippers, priority-prefixed under systemd."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import threading
import time
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer
from structlog.typing import ExceptionRenderer

from vibectld.ops import journal

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


# A value as MESSAGE's "key=value" summary shows it; the field itself holds up to
# journal.MAX_VALUE_BYTES of it.
_SUMMARY_VALUE_BYTES = 1024


def _short(value: Any, limit: int) -> Any:
    """`value`, or its text cut to `limit` bytes with a marker (journal.cut)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit // 4:  # No UTF-8 character is longer than 4 bytes.
        return value
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return value
    return journal.cut(data, limit).decode("utf-8", "replace")


def _journal_line(_: Any, __: str, event: dict[str, Any]) -> str:
    priority = event.pop("_priority", 6)
    for key, value in event.items():
        limit = journal.MAX_MESSAGE_BYTES if key == "exception" else journal.MAX_VALUE_BYTES
        event[key] = _short(value, limit)
    text = structlog.processors.KeyValueRenderer(key_order=["event"], drop_missing=True)(
        None, "", event
    )
    # journald splits a stream line longer than its LineMax= (48 KiB by default).
    return f"<{priority}>{_short(text, journal.MAX_MESSAGE_BYTES)}"


def _journal_entry(_: Any, method: str, event: dict[str, Any]) -> bytes:
    event.pop("level", None)
    details = " ".join(
        f"{k}={_short(v, _SUMMARY_VALUE_BYTES)}"
        for k, v in event.items()
        if k not in ("event", "exception")
    )
    message = f"{event.get('event', '')} {details}".strip()
    if "exception" in event:
        message += "\n" + str(event["exception"])
    fields: dict[str, Any] = {
        "MESSAGE": message,
        "PRIORITY": _PRIORITY.get(method, 6),
        "SYSLOG_IDENTIFIER": "vibectld",
    }
    for key, value in event.items():
        fields.setdefault(journal.field_name(key), value)
    return journal.encode(fields)


class _Second:
    """The ISO-8601 text of the current second, formatted once per second."""

    second = -1
    text = ""


def _utc_timestamp(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    now = time.time()
    second = int(now)
    if second != _Second.second:
        _Second.second, _Second.text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    event["timestamp"] = f"{_Second.text}.{int((now - second) * 1000):03d}Z"
    return event


def _console_tracebacks(colors: bool) -> ExceptionRenderer:
    """Tracebacks without local variables: rich's when it is installed, else plain.

    ConsoleRenderer's default (rich, or better-exceptions) shows every frame's locals.
    The journal format uses format_exc_info, which never shows them.
    """
    if importlib.util.find_spec("rich") is None:
        return structlog.dev.plain_traceback
    return structlog.dev.RichTracebackFormatter(
        color_system="truecolor" if colors else None, show_locals=False
    )


def resolve_format(fmt: str, stream: TextIO) -> str:
    if fmt != "auto":
        return fmt
    if under_journald(stream):
        return "journal"
    return "console" if stream.isatty() else "json"


class _LineWriter:
    """Writes each record and its newline in one write, flushed at once.

    With server.workers above 1 the main process and its workers share one stderr;
    structlog's PrintLogger writes a record and its newline separately, and under
    `python -u` (or past the buffer) those are two syscalls that another process's
    record can fall between, joining two records on one line.
    """

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def msg(self, message: str) -> None:
        with self._lock:
            self._out.write(message + "\n")
            self._out.flush()

    log = debug = info = warning = warn = error = err = critical = fatal = exception = msg
    failure = msg


class _Sinks:
    """The journal socket of the current configuration, closed when it is replaced."""

    current: journal.JournalLogger | None = None

    @classmethod
    def replace(cls, sink: journal.JournalLogger | None) -> None:
        if cls.current is not None:
            cls.current.close()
        cls.current = sink


def reset() -> None:
    """Back to structlog's defaults (tests), closing any journal socket."""
    _Sinks.replace(None)
    structlog.reset_defaults()


def configure(
    level: str = "info",
    fmt: str = "auto",
    stream: TextIO | None = None,
    journal_socket: str = journal.JOURNAL_SOCKET,
) -> str:
    """Configure structlog for the process; returns the format chosen."""
    out = stream or sys.stderr
    chosen = resolve_format(fmt, out)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    renderer: list[Any]
    writer = _LineWriter(out)
    factory: Any = lambda *_: writer  # noqa: E731 - structlog wants a factory
    if chosen == "journal" and journal.journal_available(journal_socket):
        renderer = [structlog.processors.format_exc_info, _journal_entry]
        sink = journal.JournalLogger(journal_socket)
        _Sinks.replace(sink)
        factory = lambda *_: sink  # noqa: E731 - structlog wants a factory
    elif chosen == "journal":
        # journald stamps time itself.
        renderer = [_priority_prefix, structlog.processors.format_exc_info, _journal_line]
    elif chosen == "json":
        renderer = [
            _utc_timestamp,
            # structlog's default (dict_tracebacks) records each frame's local variables,
            # and a provider key held in a local is then in the log: never.
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(),
        ]
    else:
        renderer = [
            structlog.processors.TimeStamper(fmt="%H:%M:%S", utc=False),
            structlog.dev.ConsoleRenderer(
                colors=out.isatty(), exception_formatter=_console_tracebacks(out.isatty())
            ),
        ]
    structlog.configure(
        processors=shared + renderer,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        # Loggers are built once: per-call construction costs more than the record.
        cache_logger_on_first_use=True,
    )
    return chosen
