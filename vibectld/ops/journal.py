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
# journald accepts entries of hundreds of MiB, but an entry sent as one datagram must fit
# the sender's socket buffer (net.core.wmem_default, 208 KiB by default) or send() fails,
# and a datagram cut short loses every field after the cut (a value cut mid-line is
# "trailing noise" to journald). So each value is cut on its own, keeping its start and
# its end, and the entry as a whole stays far below any socket buffer.
MAX_ENTRY_BYTES = 64 * 1024
# Any one field but MESSAGE: enough for an upstream error body, not for a flood.
MAX_VALUE_BYTES = 4096
# MESSAGE carries a traceback when there is one; the cut keeps its last lines.
MAX_MESSAGE_BYTES = 32 * 1024
# The fields a record is found by (`journalctl CLIENT=alice`, `EVENT=request`), placed
# first so that no cut or dropped field can ever take them: each is at most
# MAX_VALUE_BYTES, together far under MAX_ENTRY_BYTES.
ESSENTIAL_FIELDS = (
    "PRIORITY",
    "SYSLOG_IDENTIFIER",
    "EVENT",
    "CLIENT",
    "STATUS",
    "REQUEST_ID",
    "AUDIT",
    "MODEL",
)
# Names the fields left out when the entry had no room left for them (comma-separated).
DROPPED_FIELD = "VIBECTLD_FIELDS_DROPPED"
_DROPPED_ROOM = 1024
_MARKER = "[... %d bytes cut ...]"
_RANK = {name: i for i, name in enumerate(ESSENTIAL_FIELDS)}
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


def cut(data: bytes, limit: int) -> bytes:
    """`data` if it fits in `limit` bytes, else its start and end around a marker.

    Both ends are kept on UTF-8 character boundaries: an identifier reads from its start,
    a traceback ends with the exception.
    """
    if len(data) <= limit:
        return data
    # The marker is sized for the longest count it could hold, so the result fits.
    keep = max(limit - len((_MARKER % len(data)).encode()), 0)
    head = data[: keep - keep // 2].decode("utf-8", "ignore").encode()
    tail = data[len(data) - keep // 2 :].decode("utf-8", "ignore").encode()
    marker = (_MARKER % (len(data) - len(head) - len(tail))).encode()
    return head + marker + tail


def _line(name: bytes, data: bytes) -> bytes:
    if b"\n" in data:
        return name + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return name + b"=" + data + b"\n"


def encode(fields: dict[str, Any]) -> bytes:
    """One native-protocol entry of at most MAX_ENTRY_BYTES, the essential fields intact."""
    named = [(field_name(key), value) for key, value in fields.items() if value is not None]
    # Essential fields, then MESSAGE, then the rest in the order given (a stable sort).
    named.sort(key=lambda item: _RANK.get(item[0], len(_RANK) + (item[0] != "MESSAGE")))
    out = bytearray()
    dropped: list[str] = []
    # Room is kept for the line naming dropped fields, should there be any.
    budget = MAX_ENTRY_BYTES - _DROPPED_ROOM
    for name, value in named:
        limit = MAX_MESSAGE_BYTES if name == "MESSAGE" else MAX_VALUE_BYTES
        # Field name, "=" or "\n" + 8-byte length, final "\n".
        room = min(limit, budget - len(out) - len(name) - 10)
        if room < 64:
            dropped.append(name)
            continue
        out += _line(name.encode(), cut(_value(value).encode("utf-8", "replace"), room))
    if dropped:
        out += _line(DROPPED_FIELD.encode(), cut(",".join(dropped).encode(), _DROPPED_ROOM - 64))
    return bytes(out)


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
