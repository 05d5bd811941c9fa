"""The admin socket: an asyncio Unix stream server speaking `protocol`.

Identity comes from the kernel: every connection's peer uid is read with
SO_PEERCRED, and a route declared ``write=True`` runs only for root, the
daemon's own uid or a member of the admin group. Every write operation —
allowed, refused or failed — is written to the audit log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import os
import pwd
import re
import socket
import stat
import struct
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import structlog

from vibectld.admin import protocol
from vibectld.admin.protocol import ErrorCode, ProtocolError, WireError

SOCKET_MODE = 0o660
# vibectl-admin sends its request as soon as it connects and closes after the answer; a
# connection with nothing to read for this long is a stalled or forgotten client.
IDLE_TIMEOUT_SECONDS = 30.0
MAX_CONNECTIONS = 64
# Per peer uid, so that one user's stalled scripts cannot take every connection and lock
# out the others (root, and ExecReload=, which runs as the daemon's own uid).
MAX_CONNECTIONS_PER_UID = 16
_OP_NAME = re.compile(r"^[a-z][a-z0-9]*(?:_[a-z0-9]+)*$")
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Caller:
    """Who is on the other end of a connection, as the kernel reports it."""

    uid: int
    gid: int
    pid: int
    user: str  # The passwd name of uid, or str(uid) if it has none.
    can_write: bool


class AdminError(WireError):
    """Raised by a handler: the caller gets an error response with this code."""


class AdminSocketError(OSError):
    """The admin socket cannot be bound; the message names the path and what to do."""


Handler = Callable[[Caller, dict[str, Any]], Awaitable[dict[str, Any]]]
# Called for every write operation (allowed, refused or failed): caller, op, target, outcome.
AuditSink = Callable[[Caller, str, str | None, str], None]
Ctx = TypeVar("Ctx")
# A declared handler: like Handler, but first given the state it works on.
BoundHandler = Callable[[Ctx, Caller, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Route:
    handler: Handler
    # True: the operation changes state, needs write permission and is audited.
    write: bool


class RouteTable(Generic[Ctx]):
    """Operations declared beside their handlers, each with its permission.

    ``@table.route("issue_client", write=True)`` on a module-level handler registers it
    when the module is imported, so a misspelt or duplicate operation name fails then,
    not when a caller first tries it. `bind` gives the server its routes, each handler
    given `ctx` first and passed through `wrap` (one place to translate exceptions).
    """

    def __init__(self) -> None:
        self._declared: dict[str, tuple[BoundHandler[Ctx], bool]] = {}

    def route(self, op: str, *, write: bool) -> Callable[[BoundHandler[Ctx]], BoundHandler[Ctx]]:
        _check_op_name(op)

        def register(handler: BoundHandler[Ctx]) -> BoundHandler[Ctx]:
            if op in self._declared:
                raise ValueError(f"admin route {op!r} is declared twice")
            self._declared[op] = (handler, write)
            return handler

        return register

    def bind(self, ctx: Ctx, wrap: Callable[[Handler], Handler] = lambda h: h) -> dict[str, Route]:
        return {
            op: Route(wrap(functools.partial(handler, ctx)), write=write)
            for op, (handler, write) in sorted(self._declared.items())
        }


def _peer_credentials(sock: Any) -> tuple[int, int, int]:
    """The connecting process's pid, uid and gid, as the kernel recorded them at connect."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(creds)
    return int(pid), int(uid), int(gid)


def _check_op_name(op: object) -> None:
    if not isinstance(op, str) or not _OP_NAME.match(op):
        raise ValueError(f"admin route {op!r}: operation names must be snake_case")


class AdminServer:
    def __init__(
        self,
        path: Path,
        group: str | None,
        routes: Mapping[str, Route],
        *,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_uid: int = MAX_CONNECTIONS_PER_UID,
        on_audit: AuditSink | None = None,
    ) -> None:
        for op, route in routes.items():
            _check_op_name(op)
            if not isinstance(route, Route):
                raise TypeError(f"admin route {op!r}: expected a Route, got {route!r}")
        self._path = path
        self._group = group
        self._routes = dict(sorted(routes.items()))
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._max_per_uid = max_connections_per_uid
        self._server: asyncio.Server | None = None
        self._identity: tuple[int, int, int] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._per_uid: dict[int, int] = {}
        self._on_audit = on_audit

    @property
    def path(self) -> Path:
        return self._path

    async def start(self) -> None:
        """Bind the socket, set its mode and group, and start accepting connections."""
        sock = await self._bind()
        try:
            self._server = await asyncio.start_unix_server(
                self._on_connection, sock=sock, limit=protocol.MAX_LINE_BYTES
            )
        except BaseException:
            sock.close()
            self._unlink_if_ours()
            raise
        structlog.get_logger("vibectld.admin").info("admin.listening", path=str(self._path))

    async def close(self) -> None:
        """Stop accepting, close every connection and remove the socket file if it is ours."""
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self._unlink_if_ours()

    # -- binding -----------------------------------------------------------------------

    async def _bind(self) -> socket.socket:
        path = self._path
        if not path.parent.is_dir():
            raise AdminSocketError(
                f"cannot create the admin socket {path}: directory {path.parent} does not "
                "exist; create it or set admin.socket"
            )
        try:
            st = path.lstat()
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise AdminSocketError(
                    f"{path} exists and is not a socket; move it away or set admin.socket"
                )
            await self._remove_stale_socket()
        # Bound in a private directory beside it, given its mode and group, then renamed
        # into place: the socket never exists where others can reach it with looser
        # permissions, and the process's umask (shared by every thread) is left alone.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A short name: the staged path must fit a socket address as the final one does.
            private = tempfile.mkdtemp(prefix=".", dir=path.parent)
        except OSError as e:
            sock.close()
            raise AdminSocketError(f"cannot bind the admin socket {path}: {e.strerror}") from e
        staged = Path(private) / "s"
        try:
            sock.bind(str(staged))
            os.chmod(staged, SOCKET_MODE)
            self._set_group(staged)
            os.rename(staged, path)
        except OSError as e:
            sock.close()
            raise AdminSocketError(f"cannot bind the admin socket {path}: {e.strerror}") from e
        finally:
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            os.rmdir(private)
        self._identity = self._file_identity()
        return sock

    async def _remove_stale_socket(self) -> None:
        path = self._path
        try:
            _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2.0)
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens: a leftover of a daemon that did not shut down cleanly.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            structlog.get_logger("vibectld.admin").info(
                "admin.stale_socket_removed", path=str(path)
            )
            return
        except TimeoutError:
            raise AdminSocketError(
                f"{path} exists and a process holds it but does not answer; stop the other "
                "vibectld or set admin.socket"
            ) from None
        except OSError as e:
            raise AdminSocketError(
                f"{path} exists and cannot be checked ({e.strerror}); remove it if no "
                "vibectld is running, or set admin.socket"
            ) from e
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise AdminSocketError(f"another vibectld is serving {path}; stop it first")

    def _set_group(self, staged: Path) -> None:
        if self._group is None:
            return
        log = structlog.get_logger("vibectld.admin")
        who = f"only root and uid {os.getuid()} can change state"
        try:
            gid = grp.getgrnam(self._group).gr_gid
        except KeyError:
            log.warning(
                "admin.group_missing",
                group=self._group,
                path=str(self._path),
                hint=f"group '{self._group}' does not exist; {who}",
            )
            return
        try:
            os.chown(staged, -1, gid)
        except PermissionError:
            log.warning(
                "admin.group_not_set",
                group=self._group,
                path=str(self._path),
                hint=f"cannot give the socket group '{self._group}' (the daemon is not a "
                f"member); {who}",
            )

    def _file_identity(self) -> tuple[int, int, int] | None:
        # The change time guards against a replacement that reuses the inode number.
        try:
            st = self._path.lstat()
        except FileNotFoundError:
            return None
        if not stat.S_ISSOCK(st.st_mode):
            return None
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    def _unlink_if_ours(self) -> None:
        if self._identity is not None and self._file_identity() == self._identity:
            with contextlib.suppress(FileNotFoundError):
                self._path.unlink()
        self._identity = None

    # -- connections -------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        log = structlog.get_logger("vibectld.admin")
        if len(self._connections) >= self._max_connections:
            log.warning("admin.too_many_connections", limit=self._max_connections)
            message = f"too many admin connections (limit {self._max_connections}); try again"
            await self._refuse(writer, message)
            return
        try:
            # One getsockopt(2): no reason to leave the loop before the limits are checked.
            pid, uid, gid = _peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        if self._per_uid.get(uid, 0) >= self._max_per_uid:
            log.warning(
                "admin.too_many_connections_for_uid",
                caller_uid=uid,
                caller_pid=pid,
                limit=self._max_per_uid,
            )
            message = (
                f"too many admin connections from uid {uid} (limit {self._max_per_uid} per "
                f"user); close the ones you hold (idle ones close after "
                f"{self._idle_timeout:g} s) and try again"
            )
            await self._refuse(writer, message)
            return
        self._connections.add(task)
        self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        try:
            caller = await asyncio.to_thread(self._identify, pid, uid, gid)
            await self._serve(caller, reader, writer)
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass  # The client went away or idled out; nothing to answer.
        except Exception:
            log.exception("admin.connection_failed")
        finally:
            self._connections.discard(task)
            if self._per_uid[uid] <= 1:
                del self._per_uid[uid]
            else:
                self._per_uid[uid] -= 1
            writer.close()

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, message: str) -> None:
        """Answer a connection that is over a limit with one error, then close it."""
        with contextlib.suppress(Exception):
            writer.write(protocol.encode_error(None, ErrorCode.FAILED, message))
            await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()

    async def _serve(
        self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self._idle_timeout)
            except asyncio.LimitOverrunError:
                message = f"request line exceeds {protocol.MAX_LINE_BYTES} bytes"
                writer.write(protocol.encode_error(None, ErrorCode.BAD_REQUEST, message))
                await asyncio.wait_for(writer.drain(), self._idle_timeout)
                return
            except asyncio.IncompleteReadError:
                return  # EOF between requests (or within an unterminated one).
            writer.write(await self._dispatch(caller, line))
            await asyncio.wait_for(writer.drain(), self._idle_timeout)

    def _identify(self, pid: int, uid: int, gid: int) -> Caller:
        # Name service look-ups (NSS, perhaps LDAP) can block: run in a thread.
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        return Caller(uid=uid, gid=gid, pid=pid, user=user, can_write=self._may_write(uid, gid))

    def _may_write(self, uid: int, gid: int) -> bool:
        if uid in (0, os.getuid()):
            return True
        if self._group is None:
            return False
        # Resolved on every connection so adding a user to the group needs no restart.
        try:
            group = grp.getgrnam(self._group)
            entry = pwd.getpwuid(uid)
        except KeyError:
            return False
        if group.gr_gid == gid or entry.pw_name in group.gr_mem:
            return True
        try:
            return group.gr_gid in os.getgrouplist(entry.pw_name, entry.pw_gid)
        except OSError:
            return False

    # -- dispatch ----------------------------------------------------------------------

    async def _dispatch(self, caller: Caller, line: bytes) -> bytes:
        try:
            req = protocol.decode_request(line)
        except ProtocolError as e:
            return protocol.encode_error(None, e.code, e.message)
        route = self._routes.get(req.op)
        if route is None:
            known = ", ".join(self._routes)
            return protocol.encode_error(
                req.id, ErrorCode.UNKNOWN_OP, f"unknown operation {req.op!r}; known: {known}"
            )
        if route.write and not caller.can_write:
            await self._log(caller, req, route, "refused")
            return protocol.encode_error(
                req.id, ErrorCode.PERMISSION_DENIED, self._refusal(caller, req.op)
            )
        try:
            result = await route.handler(caller, req.args)
            response = protocol.encode_result(req.id, result)
        except AdminError as e:
            await self._log(
                caller, req, route, "failed" if e.code == ErrorCode.FAILED else f"failed:{e.code}"
            )
            return protocol.encode_error(req.id, e.code, e.message)
        except Exception:
            structlog.get_logger("vibectld.admin").exception("admin.handler_crashed", op=req.op)
            await self._log(caller, req, route, f"failed:{ErrorCode.INTERNAL}")
            return protocol.encode_error(
                req.id, ErrorCode.INTERNAL, "internal error; see the vibectld log"
            )
        await self._log(caller, req, route, "ok")
        return response

    def _refusal(self, caller: Caller, op: str) -> str:
        who = f"uid {caller.uid} ({caller.user}) may not {op}"
        if self._group is None:
            return f"{who}: only root and uid {os.getuid()} may change state"
        return f"{who}: add the user to the '{self._group}' group (then log in again)"

    async def _log(self, caller: Caller, req: protocol.Request, route: Route, outcome: str) -> None:
        # Results are never logged: they can carry client secrets.
        fields: dict[str, Any] = {
            "caller_uid": caller.uid,
            "caller_user": caller.user,
            "caller_pid": caller.pid,
            "op": req.op,
            "outcome": outcome,
        }
        if route.write:
            target = req.args.get("name") or req.args.get("target")
            structlog.get_logger("vibectld.audit").info(
                f"admin.{req.op}", audit=True, target=target, **fields
            )
            if self._on_audit is not None:
                try:
                    # A committed row costs an fsync: written from a thread, not the loop.
                    await asyncio.to_thread(
                        self._on_audit, caller, req.op, str(target) if target else None, outcome
                    )
                except Exception:
                    # The journal record above stands; a broken audit table must not
                    # turn an operation that happened into one that seems to have failed.
                    structlog.get_logger("vibectld.audit").exception("audit.store_failed")
        else:
            structlog.get_logger("vibectld.admin").debug(f"admin.{req.op}", **fields)
