"""AdminServer over real Unix sockets: identity, framing, errors, binding, audit."""

from __future__ import annotations

import asyncio
import grp
import inspect
import json
import os
import pwd
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.typing import EventDict

from vibectld.admin import protocol
from vibectld.admin.client import AdminClient, AdminClientError, PermissionDenied
from vibectld.admin.server import (
    IDLE_TIMEOUT_SECONDS,
    AdminError,
    AdminServer,
    AdminSocketError,
    Caller,
    Route,
)

from .helpers import NOBODY, StartServer, call_as_nobody, needs_root


async def _echo(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    return {"args": args, "uid": caller.uid, "user": caller.user, "can_write": caller.can_write}


async def _poke(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    return {"poked": args.get("name"), "secret": "s3cr3t-result"}


async def _fail(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    raise AdminError(protocol.ErrorCode.NOT_FOUND, f"no client named {args.get('target')!r}")


async def _crash(caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


ROUTES = {
    "echo": Route(_echo, write=False),
    "poke": Route(_poke, write=True),
    "fail": Route(_fail, write=True),
    "crash": Route(_crash, write=False),
}


class Raw:
    """A raw connection, for what AdminClient refuses to send."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def response(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line.endswith(b"\n"), line
        result: dict[str, Any] = json.loads(line)
        return result

    def closed_by_server(self) -> bool:
        try:
            return self.file.readline() == b""
        except ConnectionResetError:
            return True  # Closed with our unread request still queued.

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "admin.sock"


def test_identity_and_several_requests_per_connection(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES)
    with AdminClient(sock_path) as client:
        first = client.call("echo", {"x": 1})
        second = client.call("echo")
    assert first == {
        "args": {"x": 1},
        "uid": os.getuid(),
        "user": pwd.getpwuid(os.getuid()).pw_name,
        "can_write": True,  # root or the daemon's own uid
    }
    assert second["args"] == {}


def test_socket_mode_is_0660(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES)
    st = sock_path.lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_binding_leaves_the_umask_alone_and_nothing_beside_the_socket(
    serve: StartServer, sock_path: Path
) -> None:
    # The umask is the whole process's: a bind that set it, even briefly, gave files that
    # other threads created meanwhile its mode (a test's directory came out 0600).
    before = os.umask(0o022)
    os.umask(before)
    serve(sock_path, ROUTES)
    after = os.umask(before)
    os.umask(after)
    assert after == before
    assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o660
    assert sorted(p.name for p in sock_path.parent.iterdir()) == [sock_path.name]


def test_missing_group_is_a_warning(
    serve: StartServer, sock_path: Path, logs: list[EventDict]
) -> None:
    serve(sock_path, ROUTES, group="no-such-group-vibectld")
    (warning,) = [e for e in logs if e["event"] == "admin.group_missing"]
    assert warning["log_level"] == "warning"
    assert "no-such-group-vibectld" in warning["hint"]
    assert sock_path.lstat().st_gid == os.getgid()


def test_malformed_requests_keep_the_connection(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES)
    raw = Raw(sock_path)
    try:
        raw.send(b"{not json\n")
        bad = raw.response()
        assert bad["ok"] is False and bad["error"]["code"] == "bad_request"
        assert "not valid JSON" in bad["error"]["message"]

        raw.send(b'{"v": 99, "id": 1, "op": "echo"}\n')
        version = raw.response()
        assert version["error"]["code"] == "unsupported_version"

        raw.send(b'{"v": 1, "id": "x", "op": "echo"}\n')
        assert raw.response()["error"]["code"] == "bad_request"

        raw.send(b'{"v": 1, "id": 2, "op": "nope"}\n')
        unknown = raw.response()
        assert unknown["id"] == 2 and unknown["error"]["code"] == "unknown_op"
        assert "crash, echo, fail, poke" in unknown["error"]["message"]

        raw.send(protocol.encode_request(protocol.Request(3, "echo", {"a": "b"})))
        ok = raw.response()
        assert ok == {"v": 1, "id": 3, "ok": True, "result": ok["result"]}
        assert ok["result"]["args"] == {"a": "b"}
    finally:
        raw.close()


def test_oversized_line_closes_only_that_connection(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES)
    raw = Raw(sock_path)
    try:
        raw.send(b"x" * (protocol.MAX_LINE_BYTES + 10) + b"\n")
        error = raw.response()
        assert error["error"] == {
            "code": "bad_request",
            "message": f"request line exceeds {protocol.MAX_LINE_BYTES} bytes",
        }
        assert raw.closed_by_server()
    finally:
        raw.close()
    with AdminClient(sock_path) as client:
        assert client.call("echo", {"still": "serving"})["args"] == {"still": "serving"}


def test_handler_errors(serve: StartServer, sock_path: Path, logs: list[EventDict]) -> None:
    serve(sock_path, ROUTES)
    with AdminClient(sock_path) as client:
        with pytest.raises(AdminClientError) as failed:
            client.call("fail", {"target": "ghost"})
        assert (failed.value.code, failed.value.message) == ("not_found", "no client named 'ghost'")

        with pytest.raises(AdminClientError) as crashed:
            client.call("crash")
        assert crashed.value.code == "internal"
        assert crashed.value.message == "internal error; see the vibectld log"
        # The same connection still works after a crash.
        assert client.call("echo")["can_write"] is True

    (crash_log,) = [e for e in logs if e["event"] == "admin.handler_crashed"]
    assert crash_log["op"] == "crash" and crash_log["log_level"] == "error"
    assert crash_log["exc_info"] is True
    (audit,) = [e for e in logs if e["event"] == "admin.fail"]
    assert audit["outcome"] == "failed:not_found" and audit["target"] == "ghost"


def test_write_ops_are_audited_and_results_never_logged(
    serve: StartServer, sock_path: Path, logs: list[EventDict]
) -> None:
    serve(sock_path, ROUTES)
    with AdminClient(sock_path) as client:
        assert client.call("poke", {"name": "alice"})["poked"] == "alice"
        client.call("echo", {"name": "bob"})
    (audit,) = [e for e in logs if e.get("audit")]
    assert audit == {
        "event": "admin.poke",
        "log_level": "info",
        "audit": True,
        "caller_uid": os.getuid(),
        "caller_user": pwd.getpwuid(os.getuid()).pw_name,
        "caller_pid": os.getpid(),
        "op": "poke",
        "target": "alice",
        "outcome": "ok",
    }
    (read,) = [e for e in logs if e["event"] == "admin.echo"]
    assert read["log_level"] == "debug" and "audit" not in read
    assert "s3cr3t-result" not in repr(logs)


@needs_root
def test_write_refused_for_non_members(
    serve: StartServer, shared_dir: Path, logs: list[EventDict]
) -> None:
    path = shared_dir / "admin.sock"
    serve(path, ROUTES, group="vibectld-admin")
    path.chmod(0o666)  # Let nobody connect, so the daemon (not the file mode) decides.

    read = call_as_nobody(path, "echo")
    assert read["ok"] and read["result"]["uid"] == NOBODY
    assert read["result"]["user"] == pwd.getpwuid(NOBODY).pw_name
    assert read["result"]["can_write"] is False

    refused = call_as_nobody(path, "poke", {"name": "alice"})
    user = pwd.getpwuid(NOBODY).pw_name
    assert refused == {
        "ok": False,
        "type": PermissionDenied.__name__,
        "code": "permission_denied",
        "message": f"uid {NOBODY} ({user}) may not poke: add the user to the "
        "'vibectld-admin' group (then log in again)",
    }
    (audit,) = [e for e in logs if e.get("audit")]
    assert audit["outcome"] == "refused" and audit["caller_uid"] == NOBODY
    assert audit["target"] == "alice"


@needs_root
def test_group_members_may_write(serve: StartServer, shared_dir: Path) -> None:
    # nobody's primary group is the admin group here: membership grants write.
    group = grp.getgrgid(pwd.getpwuid(NOBODY).pw_gid)
    path = shared_dir / "admin.sock"
    serve(path, ROUTES, group=group.gr_name)
    assert path.lstat().st_gid == group.gr_gid
    path.chmod(0o666)
    assert call_as_nobody(path, "poke", {"name": "x"}) == {
        "ok": True,
        "result": {"poked": "x", "secret": "s3cr3t-result"},
    }


def test_stale_socket_is_replaced(
    serve: StartServer, sock_path: Path, logs: list[EventDict]
) -> None:
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(sock_path))
    leftover.close()  # The file stays; nothing listens.
    sock_path.chmod(0o777)
    serve(sock_path, ROUTES)
    # (The inode number may be reused, so the mode and the log tell the files apart.)
    assert stat.S_IMODE(sock_path.lstat().st_mode) == 0o660
    assert [e["path"] for e in logs if e["event"] == "admin.stale_socket_removed"] == [
        str(sock_path)
    ]
    with AdminClient(sock_path) as client:
        assert client.call("echo")["args"] == {}


def test_live_socket_is_not_stolen(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES)
    inode = sock_path.lstat().st_ino
    second = AdminServer(sock_path, None, ROUTES)
    with pytest.raises(AdminSocketError, match=r"another vibectld is serving .*; stop it first"):
        asyncio.run(second.start())
    asyncio.run(second.close())  # Must not remove the first server's socket.
    assert sock_path.lstat().st_ino == inode
    with AdminClient(sock_path) as client:
        assert client.call("echo")["args"] == {}


def test_non_socket_file_is_never_deleted(sock_path: Path) -> None:
    sock_path.write_text("precious")
    with pytest.raises(AdminSocketError, match="exists and is not a socket"):
        asyncio.run(AdminServer(sock_path, None, ROUTES).start())
    assert sock_path.read_text() == "precious"


def test_missing_directory_is_named(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "admin.sock"
    with pytest.raises(AdminSocketError, match=r"missing does not exist; create it or set admin"):
        asyncio.run(AdminServer(path, None, ROUTES).start())


def test_close_removes_only_our_socket(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"

    async def scenario() -> None:
        server = AdminServer(path, None, ROUTES)
        await server.start()
        await server.close()
        assert not path.exists()

        server = AdminServer(path, None, ROUTES)
        await server.start()
        path.unlink()
        path.write_text("someone else's")
        await server.close()

    asyncio.run(scenario())
    assert path.read_text() == "someone else's"


@pytest.mark.parametrize("op", ["Poke", "poke-it", "_poke", "poke__it", "", "2poke"])
def test_route_names_must_be_snake_case(tmp_path: Path, op: str) -> None:
    with pytest.raises(ValueError, match="snake_case"):
        AdminServer(tmp_path / "s", None, {op: ROUTES["poke"]})


def test_idle_connections_are_closed(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES, idle_timeout=0.3)
    raw = Raw(sock_path)
    try:
        raw.send(b'{"v": 1, "id": 1, "op"')  # A client that stalls mid-request.
        start = time.monotonic()
        assert raw.closed_by_server()
        assert time.monotonic() - start < 4
    finally:
        raw.close()


def test_connection_cap_and_slow_clients(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES, max_connections=2)
    held = [Raw(sock_path), Raw(sock_path)]
    try:
        for i, raw in enumerate(held):
            raw.send(protocol.encode_request(protocol.Request(i, "echo", {})))
            assert raw.response()["ok"]
        held[0].send(b'{"v": 1, "id": 9, ')  # Half a request: it must not block anyone.
        extra = Raw(sock_path)
        try:
            refused = extra.response()
            assert refused["error"]["code"] == "failed"
            assert "too many admin connections (limit 2)" in refused["error"]["message"]
            assert extra.closed_by_server()
        finally:
            extra.close()
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # The server notices the closed connection asynchronously.
            try:
                with AdminClient(sock_path) as client:
                    assert client.call("echo")["args"] == {}
                break
            except AdminClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        for raw in held:
            raw.close()


def test_idle_connections_close_after_30_seconds_by_default() -> None:
    # The tests inject a short timeout; the daemon builds its server with the default.
    default = inspect.signature(AdminServer).parameters["idle_timeout"].default
    assert default == IDLE_TIMEOUT_SECONDS == 30


def test_an_idle_connection_after_a_request_is_closed(serve: StartServer, sock_path: Path) -> None:
    serve(sock_path, ROUTES, idle_timeout=0.5)
    raw = Raw(sock_path)
    try:
        raw.send(protocol.encode_request(protocol.Request(1, "echo", {})))
        assert raw.response()["ok"]
        start = time.monotonic()
        assert raw.closed_by_server()  # Nothing more sent: idle from here on.
        assert 0.4 <= time.monotonic() - start < 4
    finally:
        raw.close()
    with AdminClient(sock_path) as client:
        assert client.call("echo")["args"] == {}


def test_connections_per_uid_are_limited(
    serve: StartServer, sock_path: Path, logs: list[EventDict]
) -> None:
    serve(sock_path, ROUTES, max_connections_per_uid=2)
    held = [Raw(sock_path), Raw(sock_path)]
    try:
        for i, raw in enumerate(held):
            raw.send(protocol.encode_request(protocol.Request(i, "echo", {})))
            assert raw.response()["ok"]
        extra = Raw(sock_path)
        try:
            refused = extra.response()
            assert refused["ok"] is False and refused["error"]["code"] == "failed"
            assert refused["error"]["message"] == (
                f"too many admin connections from uid {os.getuid()} (limit 2 per user); "
                "close the ones you hold (idle ones close after 30 s) and try again"
            )
            assert extra.closed_by_server()
        finally:
            extra.close()
        (warning,) = [e for e in logs if e["event"] == "admin.too_many_connections_for_uid"]
        assert warning["caller_uid"] == os.getuid() and warning["limit"] == 2
        # The client library reports it as a failure with that message.
        refusal = "too many admin connections from uid"
        with pytest.raises(AdminClientError, match=refusal), AdminClient(sock_path) as client:
            client.call("echo")
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # The server notices the closed connection asynchronously.
            try:
                with AdminClient(sock_path) as client:
                    assert client.call("echo")["args"] == {}
                break
            except AdminClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        for raw in held:
            raw.close()


@needs_root
def test_one_uid_at_its_limit_does_not_lock_out_another(
    serve: StartServer, shared_dir: Path
) -> None:
    path = shared_dir / "admin.sock"
    serve(path, ROUTES, max_connections_per_uid=2)
    path.chmod(0o666)
    held = [Raw(path), Raw(path)]
    try:
        for raw in held:
            raw.send(b'{"v": 1, "id": 1, ')  # Stalled mid-request, as a hung script would.
        read = call_as_nobody(path, "echo")
        assert read["ok"] and read["result"]["uid"] == NOBODY
    finally:
        for raw in held:
            raw.close()


def test_the_client_reads_a_refusal_sent_before_its_request_was_read(sock_path: Path) -> None:
    """A daemon that refuses a connection answers and closes without reading the request;
    the client's write then fails (EPIPE), but the answer is there to read and to show."""
    import threading

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(1)
    closed = threading.Event()

    def refuse() -> None:
        conn, _ = listener.accept()
        conn.sendall(protocol.encode_error(None, "failed", "too many admin connections"))
        conn.close()
        closed.set()

    server = threading.Thread(target=refuse)
    server.start()
    try:
        with AdminClient(sock_path) as client:
            client._connect()  # connected; the request goes out only after the refusal
            assert closed.wait(10)
            with pytest.raises(AdminClientError, match="too many admin connections"):
                client.call("echo")
    finally:
        server.join(10)
        listener.close()
