"""Logging: native journal entries with structured fields, and the fallbacks."""

from __future__ import annotations

import io
import json
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.conftest import short_tmpdir
from vibectld.ops import logs
from vibectld.ops.journal import encode, field_name


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
