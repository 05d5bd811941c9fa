"""AdminClient: the synchronous client of the admin socket, used by vibectl-admin.

It imports only the standard library and `vibectld.admin.protocol`, never daemon
internals. Wire errors become typed exceptions whose messages say what to do.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from pathlib import Path
from typing import Any

from vibectld.admin import protocol
from vibectld.admin.protocol import ErrorCode, ProtocolError, WireError

# Client-side error codes (never sent on the wire).
UNREACHABLE = "unreachable"
# Responses (e.g. a long client list) may be far larger than a request line.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
_ADMIN_GROUP_HINT = (
    "ask an admin to add you to the vibectld-admin group (then log in again), or use --socket"
)


class AdminClientError(WireError):
    """An operation failed; `code` is a protocol.ErrorCode value or UNREACHABLE."""


class DaemonUnreachable(AdminClientError):
    """Nothing answers at the socket path (missing, refused, hung or gone)."""


class PermissionDenied(AdminClientError):
    """The socket may not be opened, or the daemon refused the operation."""


class AdminClient:
    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._next_id = 1

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its result; raise AdminClientError for ok=false."""
        req_id = self._next_id
        self._next_id += 1
        line = protocol.encode_request(protocol.Request(id=req_id, op=op, args=args or {}))
        if len(line) - 1 > protocol.MAX_LINE_BYTES:
            raise AdminClientError(
                ErrorCode.BAD_REQUEST,
                f"the request is larger than {protocol.MAX_LINE_BYTES} bytes; shorten it",
            )
        sock = self._connect()
        try:
            # The daemon may refuse the connection itself (too many from this user) and close
            # it before reading the request: its answer is still ours to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(line)
            reply = self._read_line(sock)
        except TimeoutError:
            self.close()
            raise DaemonUnreachable(
                UNREACHABLE,
                f"vibectld at {self.path} did not answer within {self.timeout:g} s; "
                "try: systemctl status vibectld",
            ) from None
        except OSError as e:
            self.close()
            raise DaemonUnreachable(
                UNREACHABLE,
                f"lost the connection to vibectld at {self.path}: {e.strerror or e}; "
                "try: systemctl status vibectld",
            ) from None
        try:
            response = protocol.decode_response(reply)
        except ProtocolError as e:
            self.close()
            raise AdminClientError(e.code, e.message) from None
        if response.get("id") not in (req_id, None):
            self.close()
            raise AdminClientError(ErrorCode.INTERNAL, "daemon answered a different request")
        if not response["ok"]:
            error = response.get("error")
            if not isinstance(error, dict):
                raise AdminClientError(ErrorCode.INTERNAL, "daemon sent a malformed error")
            code = str(error.get("code", ErrorCode.INTERNAL))
            message = str(error.get("message", "unknown error"))
            if code == ErrorCode.PERMISSION_DENIED:
                raise PermissionDenied(code, message)
            raise AdminClientError(code, message)
        result = response.get("result")
        if not isinstance(result, dict):
            raise AdminClientError(ErrorCode.INTERNAL, "daemon sent a malformed result")
        return result

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as e:
            sock.close()
            raise self._connect_error(e) from None
        self._sock = sock
        return sock

    def _connect_error(self, e: OSError) -> AdminClientError:
        if e.errno in (errno.EACCES, errno.EPERM):
            return PermissionDenied(
                ErrorCode.PERMISSION_DENIED,
                f"permission denied opening {self.path}: {_ADMIN_GROUP_HINT}",
            )
        if e.errno == errno.ENOENT:
            why = "no such socket"
        elif e.errno == errno.ECONNREFUSED:
            why = "connection refused (a stale socket?)"
        elif isinstance(e, TimeoutError):
            why = f"no answer within {self.timeout:g} s"
        else:
            why = e.strerror or str(e)
        return DaemonUnreachable(
            UNREACHABLE,
            f"cannot reach vibectld at {self.path}: {why}; is vibectld running? "
            "try: systemctl status vibectld",
        )

    def _read_line(self, sock: socket.socket) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                self.close()
                raise DaemonUnreachable(
                    UNREACHABLE,
                    f"vibectld at {self.path} closed the connection without answering; "
                    "try: systemctl status vibectld",
                )
            end = chunk.find(b"\n")
            if end >= 0:
                # One request is in flight at a time, so nothing follows the newline.
                chunks.append(chunk[: end + 1])
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                self.close()
                raise AdminClientError(ErrorCode.INTERNAL, "daemon sent an oversized response")
