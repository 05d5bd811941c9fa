"""Facts the man pages state that the code also states: operations, codes, limits, paths."""

from __future__ import annotations

import inspect
import re
from typing import TypeVar
from unittest import mock

import vibectl.errors
import vibectld.admin.cli
from tests.docs.manpage import Page, mentions
from vibectld import config_file
from vibectld.admin import protocol, server
from vibectld.admin.routes import build_routes
from vibectld.providers import execution
from vibectld.service import refusals

_OPERATION = re.compile(r"^([a-z_]+) \((read|write)\)$")
_EXIT_CODE = re.compile(r"^ {7}(\d+)(?:\s|$)")


def exit_codes(page: Page) -> set[int]:
    return {
        int(m.group(1)) for line in page.section("EXIT STATUS") if (m := _EXIT_CODE.match(line))
    }


def test_admin_operations_and_their_permissions() -> None:
    # The handlers are closures over their arguments, so stand-ins suffice to list them.
    stand_ins = [mock.MagicMock() for _ in inspect.signature(build_routes).parameters]
    real = {op: "write" if r.write else "read" for op, r in build_routes(*stand_ins).items()}
    page = Page.load("vibectl-admin.8")
    ops = page.subsections("ADMIN SOCKET PROTOCOL")["Operations"]
    documented = {
        m.group(1): m.group(2) for tag in page.tagged(ops) if (m := _OPERATION.match(tag))
    }
    assert documented == real


def test_admin_error_codes_and_protocol_limits() -> None:
    section = Page.load("vibectl-admin.8").subsections("ADMIN SOCKET PROTOCOL")
    codes = "\n".join(section["Error codes"])
    real = [v for k, v in vars(protocol.ErrorCode).items() if k.isupper()]
    assert [c for c in real if not mentions(codes, c)] == []
    assert f'"v": {protocol.PROTOCOL_VERSION}' in "\n".join(section["Versioning"])
    assert mentions("\n".join(section["Framing"]), str(protocol.MAX_LINE_BYTES))
    transport = "\n".join(section["Transport"])
    assert mentions(transport, str(server.MAX_CONNECTIONS))
    assert mentions(transport, f"{server.IDLE_TIMEOUT_SECONDS:g}")
    assert mentions(transport, f"{server.SOCKET_MODE:04o}")


def test_admin_exit_codes_and_environment() -> None:
    page = Page.load("vibectl-admin.8")
    real = {v for k, v in vars(vibectld.admin.cli).items() if k.startswith("EX_")}
    assert exit_codes(page) == real
    assert mentions("\n".join(page.section("ENVIRONMENT")), vibectld.admin.cli.SOCKET_ENV)
    assert mentions(page.text, vibectld.admin.cli.DEFAULT_SOCKET)


T = TypeVar("T")


def _subclasses(cls: type[T]) -> set[type[T]]:
    found: set[type[T]] = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def test_client_exit_codes() -> None:
    base = vibectl.errors.VibectlError
    errors = {base} | _subclasses(base)
    real = {0} | {e.exit_code for e in errors}
    # 130 is an interrupt (cli_common.handles_errors); 2 also comes from click itself.
    assert exit_codes(Page.load("vibectl.1")) == real | {130}


def test_daemon_error_codes() -> None:
    errors = "\n".join(Page.load("vibectld.8").section("ERRORS"))
    in_band = [v for k, v in vars(execution.ErrorCode).items() if k.isupper()]
    statuses = {c.code.name for c in _subclasses(refusals.CallRefused)}
    missing = [c for c in [*in_band, *sorted(statuses)] if not mentions(errors, c)]
    assert missing == []


def test_daemon_config_path_and_environment() -> None:
    page = Page.load("vibectld.8")
    assert mentions("\n".join(page.section("ENVIRONMENT")), config_file.CONFIG_ENV)
    assert mentions("\n".join(page.section("FILES")), str(config_file.DEFAULT_CONFIG_PATH))
