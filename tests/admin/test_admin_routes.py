"""The admin route table is declared, sorted and unique; registry errors map in one place."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

import vibectld.admin.routes as routes
from vibectld.admin.protocol import ErrorCode
from vibectld.admin.server import Caller, RouteTable
from vibectld.generation import GenerationRejected
from vibectld.pki.signing import SigningKeyError, SigningKeyInUse, UnknownSigningKey
from vibectld.store.registry import (
    AlreadyRevoked,
    ClientNotFound,
    DuplicateClient,
    InvalidRecord,
    RegistryError,
    StorageFailure,
)


async def _handler(ctx: object, caller: Caller, args: dict[str, Any]) -> dict[str, Any]:
    return {}


def test_a_duplicate_operation_name_fails_at_registration() -> None:
    table: RouteTable[object] = RouteTable()
    table.route("issue_client", write=True)(_handler)
    with pytest.raises(ValueError, match="'issue_client' is declared twice"):
        table.route("issue_client", write=False)(_handler)


def test_a_badly_named_operation_fails_at_registration() -> None:
    table: RouteTable[object] = RouteTable()
    with pytest.raises(ValueError, match="snake_case"):
        table.route("issue-client", write=True)


def test_a_module_that_declares_an_operation_twice_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "twice_declared.py").write_text(
        "from vibectld.admin.server import RouteTable\n"
        "ROUTES = RouteTable()\n"
        "@ROUTES.route('status', write=False)\n"
        "async def status(ctx, caller, args):\n"
        "    return {}\n"
        "@ROUTES.route('status', write=False)\n"
        "async def status_again(ctx, caller, args):\n"
        "    return {}\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(ValueError, match="'status' is declared twice"):
            importlib.import_module("twice_declared")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("twice_declared", None)


def test_the_table_is_sorted_and_declares_each_permission() -> None:
    bound = routes.build_routes(mock.MagicMock(), mock.AsyncMock(), mock.MagicMock())
    assert list(bound) == sorted(bound)
    writes = {op for op, r in bound.items() if r.write}
    assert writes == {
        "issue_client",
        "reload",
        "retire_signing_key",
        "revoke_client",
        "rotate_signing_key",
        "storage_migrate",
        "update_client",
    }


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ClientNotFound("no client named 'x'"), ErrorCode.NOT_FOUND),
        (DuplicateClient("an active client named 'x' exists"), ErrorCode.CONFLICT),
        (InvalidRecord("rpm must be a whole number"), ErrorCode.BAD_REQUEST),
        (AlreadyRevoked("client 'x' is revoked"), ErrorCode.FAILED),
        (StorageFailure("cannot write the client registry: disk I/O error"), ErrorCode.FAILED),
        (RegistryError("something else"), ErrorCode.FAILED),
        (GenerationRejected("models.default: no such model"), ErrorCode.FAILED),
        (UnknownSigningKey("no signing key has the kid 'x'"), ErrorCode.NOT_FOUND),
        # The current or only key: exit 1, as the issue asks, not a usage error.
        (SigningKeyInUse("the signing key k is the current one"), ErrorCode.FAILED),
        (SigningKeyError("cannot move the signing key"), ErrorCode.FAILED),
    ],
)
def test_admin_error_maps_each_failure(exc: routes.Failure, code: str) -> None:
    error = routes.admin_error(exc)
    assert error.code == code
    assert str(exc) in error.message


def test_a_storage_failure_is_never_a_usage_error() -> None:
    # vibectl-admin exits 2 only for bad_request; a full disk must exit 1.
    assert not issubclass(StorageFailure, InvalidRecord)
    assert not issubclass(InvalidRecord, StorageFailure)
    assert routes.admin_error(StorageFailure("disk full")).code != ErrorCode.BAD_REQUEST
