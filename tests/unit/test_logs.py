"""Logging: native journal entries with structured fields, and the fallbacks."""

from __future__ import annotations

import io
import json
import re
import secrets
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.conftest import short_tmpdir
from vibectld.ops import logs
from vibectld.ops.journal import (
    DROPPED_FIELD,
    MAX_ENTRY_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_VALUE_BYTES,
    cut,
    encode,
    field_name,
)


def parse_entry(data: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    while data:
        line, _, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:
            size = struct.unpack("<Q", rest[:8])[0]
            fields[line.decode()] = rest[8 : 8 + size].decode()
            data = rest[8 + size + 1 :]
    return fields


@pytest.fixture
def journal_socket() -> Iterator[tuple[str, socket.socket]]:
    directory = short_tmpdir()
    path = str(directory / "journal.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(5)
    yield path, server
    server.close()
    Path(path).unlink()
    directory.rmdir()
    logs.reset()


def test_records_become_journal_fields(journal_socket: tuple[str, socket.socket]) -> None:
    path, server = journal_socket
    assert logs.configure("info", "journal", journal_socket=path) == "journal"
    log = structlog.get_logger("vibectld.proxy")
    log.info("request", client="alice", request_id="r-1", model="echo", duration_ms=4)
    log.warning("admin.revoke_client", audit=True, caller_user="root", note="two\nlines")
    log.debug("hidden")
    first = parse_entry(server.recv(65536))
    assert first["CLIENT"] == "alice" and first["REQUEST_ID"] == "r-1"
    assert first["MODEL"] == "echo" and first["DURATION_MS"] == "4"
    assert first["PRIORITY"] == "6" and first["SYSLOG_IDENTIFIER"] == "vibectld"
    assert first["MESSAGE"].startswith("request client=alice")
    second = parse_entry(server.recv(65536))
    assert second["AUDIT"] == "1" and second["PRIORITY"] == "4"
    assert second["NOTE"] == "two\nlines"


def test_without_a_journal_lines_carry_a_priority_prefix(tmp_path: Path) -> None:
    out = io.StringIO()
    logs.configure("info", "journal", stream=out, journal_socket=str(tmp_path / "none"))
    structlog.get_logger().error("start_failed", error="port in use")
    logs.reset()
    assert out.getvalue().startswith("<3>"), out.getvalue()
    assert "start_failed" in out.getvalue()


def test_json_format() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    structlog.get_logger().info("started", listen="127.0.0.1:1")
    logs.reset()
    record = json.loads(out.getvalue())
    assert record["event"] == "started" and record["level"] == "info" and "timestamp" in record


def test_field_names_are_safe() -> None:
    assert field_name("request_id") == "REQUEST_ID"
    assert field_name("_trusted") == "TRUSTED"
    assert field_name("caller-uid") == "CALLER_UID"
    assert field_name("9lives") == "F_9LIVES"
    assert encode({"A": None, "B": False}) == b"B=0\n"


# -- entries journald accepts whole --------------------------------------------------------


def recv_entry(server: socket.socket) -> tuple[bytes, dict[str, str]]:
    """One datagram, and its fields; parse_entry fails on a field cut short."""
    data = server.recv(1 << 21)
    return data, parse_entry(data)


def test_a_huge_value_is_cut_and_the_fields_a_call_is_found_by_survive(
    journal_socket: tuple[str, socket.socket],
) -> None:
    """A 900 kB request id once pushed CLIENT, STATUS and PRIORITY out of the entry."""
    path, server = journal_socket
    logs.configure("info", "journal", journal_socket=path)
    request_id = "r" * 900_000
    body = "upstream said: " + "x" * 100_000 + " (end)"
    structlog.get_logger().info(
        "request", request_id=request_id, error=body, client="alice", model="echo", status="ok"
    )
    data, entry = recv_entry(server)
    assert len(data) <= MAX_ENTRY_BYTES
    assert entry["CLIENT"] == "alice" and entry["STATUS"] == "ok" and entry["MODEL"] == "echo"
    assert entry["PRIORITY"] == "6" and entry["SYSLOG_IDENTIFIER"] == "vibectld"
    # Cut on its own, with a marker, keeping its start and its end.
    cut_id = entry["REQUEST_ID"]
    assert len(cut_id.encode()) <= MAX_VALUE_BYTES
    assert cut_id.startswith("rrrr") and cut_id.endswith("rrrr")
    assert re.search(r"\[\.\.\. \d+ bytes cut \.\.\.\]", cut_id)
    assert entry["ERROR"].startswith("upstream said: ") and entry["ERROR"].endswith(" (end)")
    assert len(entry["MESSAGE"].encode()) <= MAX_MESSAGE_BYTES
    assert entry["MESSAGE"].startswith("request request_id=rrrr")
    assert "client=alice" in entry["MESSAGE"] and "status=ok" in entry["MESSAGE"]


def test_an_entry_with_many_long_fields_stays_one_whole_datagram(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, server = journal_socket
    logs.configure("info", "journal", journal_socket=path)
    many = {f"detail_{i:02d}": f"{i}:" + "y" * 20_000 for i in range(40)}
    structlog.get_logger().warning(
        "noisy", **many, client="bob", status="PROVIDER_ERROR", request_id="r-2", audit=True
    )
    data, entry = recv_entry(server)
    assert len(data) <= MAX_ENTRY_BYTES
    assert entry["CLIENT"] == "bob" and entry["STATUS"] == "PROVIDER_ERROR"
    assert entry["REQUEST_ID"] == "r-2" and entry["AUDIT"] == "1" and entry["PRIORITY"] == "4"
    assert entry["MESSAGE"].startswith("noisy ") and entry["EVENT"] == "noisy"
    # The fields with no room left are named, not silently lost.
    kept = {name for name in entry if name.startswith("DETAIL_")}
    dropped = set(entry[DROPPED_FIELD].split(","))
    assert kept and dropped and kept | dropped == {f"DETAIL_{i:02d}" for i in range(40)}
    for name in kept:
        assert len(entry[name].encode()) <= MAX_VALUE_BYTES


def test_a_long_multiline_value_is_cut_on_character_boundaries(
    journal_socket: tuple[str, socket.socket],
) -> None:
    path, server = journal_socket
    logs.configure("info", "journal", journal_socket=path)
    structlog.get_logger().info("request", client="carol", note="ünïcødé\n" * 5000)
    _, entry = recv_entry(server)  # parse_entry decodes strictly: a split character fails
    assert entry["CLIENT"] == "carol"
    assert entry["NOTE"].startswith("ünïcødé\n") and entry["NOTE"].endswith("ünïcødé\n")
    assert len(entry["NOTE"].encode()) <= MAX_VALUE_BYTES


def test_short_values_are_never_cut() -> None:
    value = "v" * MAX_VALUE_BYTES
    assert parse_entry(encode({"CLIENT": "alice", "NOTE": value})) == {
        "CLIENT": "alice",
        "NOTE": value,
    }
    assert cut(b"abc", 3) == b"abc"
    assert len(cut(b"a" * 10_000, 100)) <= 100


def test_without_a_journal_socket_long_values_are_cut_too(tmp_path: Path) -> None:
    out = io.StringIO()
    logs.configure("info", "journal", stream=out, journal_socket=str(tmp_path / "none"))
    structlog.get_logger().info("request", client="alice", request_id="r" * 900_000)
    logs.reset()
    line = out.getvalue()
    assert line.startswith("<6>") and "client='alice'" in line
    assert len(line.encode()) <= MAX_MESSAGE_BYTES + 16
    assert "bytes cut" in line


# -- no frame locals, in any format ---------------------------------------------------------


def _call_provider(api_key: str) -> None:
    """A frame whose local holds a key when it fails, as a provider call's does."""
    headers = {"authorization": f"Bearer {api_key}"}
    raise ConnectionError(f"cannot reach the provider ({len(headers)} header)")


def _log_a_crash() -> str:
    # Made at run time: a key written here would be in the traceback's source lines.
    key = "sk-" + secrets.token_hex(24)
    try:
        _call_provider(key)
    except ConnectionError:
        structlog.get_logger().exception("provider.crashed", client="alice")
    return key


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_tracebacks_never_show_frame_locals(fmt: str) -> None:
    """A crash once logged a provider key's first 80 characters (structlog's locals)."""
    out = io.StringIO()
    logs.configure("info", fmt, stream=out)
    key = _log_a_crash()
    logs.reset()
    text = out.getvalue()
    assert "ConnectionError" in text and "_call_provider" in text, text
    assert key[:12] not in text, text


def test_journal_tracebacks_never_show_frame_locals(
    journal_socket: tuple[str, socket.socket], tmp_path: Path
) -> None:
    path, server = journal_socket
    logs.configure("info", "journal", journal_socket=path)
    key = _log_a_crash()
    _, entry = recv_entry(server)
    assert "ConnectionError" in entry["MESSAGE"] and entry["CLIENT"] == "alice"
    assert key[:12] not in repr(entry)
    # And on standard error when the journal socket is missing.
    out = io.StringIO()
    logs.configure("info", "journal", stream=out, journal_socket=str(tmp_path / "none"))
    key = _log_a_crash()
    logs.reset()
    assert "ConnectionError" in out.getvalue() and key[:12] not in out.getvalue()
