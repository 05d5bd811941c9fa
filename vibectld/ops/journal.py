"""Log records as native journal entries, so `journalctl CLIENT=alice` works.

The journal's native protocol is one datagram per entry on
/run/systemd/journal/socket: ``FIELD=value\\n`` lines, or for values holding a
newline ``FIELD\\n<u64le length><value>\\n``. Field names are upper-case
letters, digits and underscores, and must not start with an underscore
(those are the journal's own trusted fields).
"""

from __future__ import annotations

import re
import socket
import struct
import sys
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"
# Larger entries need a memfd; a log line this long is truncated instead.
MAX_DATAGRAM = 200_000
_NOT_FIELD_CHAR = re.compile(r"[^A-Z0-9_]")


def field_name(key: str) -> str:
    name = _NOT_FIELD_CHAR.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = f"F_{name}"
    return name[:64]


def _value(value: Any) -> str:
    if value is True:
        return "1"
    if value is False:
        return "0"
    return str(value)


def encode(fields: dict[str, Any]) -> bytes:
    out = bytearray()
    for key, value in fields.items():
        if value is None:
            continue
        name = field_name(key).encode()
        data = _value(value).encode("utf-8", "replace")
        if b"\n" in data:
            out += name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += name + b"=" + data + b"\n"
    return bytes(out[:MAX_DATAGRAM])


class JournalLogger:
    """A structlog logger whose every method sends one rendered entry to the journal."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self._path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.connect(path)

    def send(self, entry: bytes | str) -> None:
        if isinstance(entry, str):
            # A record rendered for the fallback: keep it, never lose it.
            sys.stderr.write(entry + "\n")
            return
        try:
            self._sock.send(entry)
        except OSError:
            # The journal went away (restart, full buffer): stderr still reaches it.
            sys.stderr.write(entry.decode("utf-8", "replace").replace("\n", " ") + "\n")

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str) -> Any:
        return self.send


def journal_available(path: str = JOURNAL_SOCKET) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
