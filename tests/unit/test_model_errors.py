"""One provider failure reads the same through vibectld and in the client's direct mode.

Both paths run a real llm model (a small one that raises what it is given): the
daemon's through its Executor, then across the wire message to the proxy client's
error; the direct mode's through LLMModelAdapter.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import llm
import pytest

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl.adapters.direct import LLMModelAdapter
from vibectl.adapters.proxy import _model_error
from vibectl.errors import ModelError
from vibectl.model_errors import ErrorCode
from vibectld.providers.catalogue import CatalogueEntry
from vibectld.providers.execution import Executor, ModelFailure, Outcome

MODEL_ID = "raises"


class StatusError(Exception):
    """What provider SDKs raise for an HTTP error: the status on the exception."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


class APITimeoutError(Exception):
    """A provider SDK's own timeout, which is not a TimeoutError."""


class Raises(llm.AsyncModel):
    model_id = MODEL_ID
    can_stream = True

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def execute(
        self, prompt: Any, stream: bool, response: Any, conversation: Any
    ) -> AsyncGenerator[str, None]:
        yield "partial "
        raise self.exc


class NeedsAKey(llm.Model):
    model_id = "needs-a-key"
    needs_key = "nokeyprovider"
    key_env_var = "NOKEYPROVIDER_API_KEY"

    def execute(self, prompt: Any, stream: bool, response: Any, conversation: Any) -> Iterator[str]:
        yield "never"


FAILURES = [
    pytest.param(StatusError(401, "Incorrect API key"), ErrorCode.PROVIDER_AUTH_ERROR, id="401"),
    pytest.param(StatusError(403, "forbidden"), ErrorCode.PROVIDER_AUTH_ERROR, id="403"),
    pytest.param(llm.NeedsKeyException("No key found"), ErrorCode.PROVIDER_AUTH_ERROR, id="no-key"),
    pytest.param(StatusError(429, "slow down"), ErrorCode.PROVIDER_RATE_LIMITED, id="429"),
    pytest.param(TimeoutError("read timed out"), ErrorCode.PROVIDER_TIMEOUT, id="timeout"),
    pytest.param(APITimeoutError("took too long"), ErrorCode.PROVIDER_TIMEOUT, id="sdk-timeout"),
    pytest.param(StatusError(500, "the model crashed"), ErrorCode.PROVIDER_ERROR, id="500"),
    pytest.param(RuntimeError("bad JSON"), ErrorCode.PROVIDER_ERROR, id="other"),
]


@pytest.fixture(autouse=True)
def _llm_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    monkeypatch.delenv("NOKEYPROVIDER_API_KEY", raising=False)


def _unchanged(text: str) -> str:
    return text


def through_the_proxy(exc: Exception, stream: bool) -> ModelError:
    """The daemon's classification, as the proxy client receives it."""
    executor = Executor(1)
    entry = CatalogueEntry(
        model_id=MODEL_ID,
        provider="test",
        aliases=(),
        supports_streaming=True,
        supports_schema=False,
        async_model=Raises(exc),
        sync_model=None,
        redact=_unchanged,
    )

    async def call() -> None:
        if stream:
            async for _ in executor.stream(entry, [], ["hi"], None, Outcome(MODEL_ID)):
                pass
        else:
            await executor.run(entry, [], ["hi"], None)

    try:
        with pytest.raises(ModelFailure) as failure:
            asyncio.run(call())
    finally:
        executor.close()
    f = failure.value
    return _model_error(
        pb.ExecuteError(error_code=f.code, error_message=f.message, error_details=f.details)
    )


def directly(exc: Exception, stream: bool) -> ModelError:
    adapter = LLMModelAdapter()
    model = Raises(exc)

    async def call() -> None:
        if stream:
            async for _ in adapter.stream_execute(model, [], ["hi"]):
                pass
        else:
            await adapter.execute(model, [], ["hi"])

    with pytest.raises(ModelError) as error:
        asyncio.run(call())
    return error.value


@pytest.mark.parametrize("stream", [False, True], ids=["execute", "stream"])
@pytest.mark.parametrize(("exc", "code"), FAILURES)
def test_a_provider_failure_has_the_same_code_in_both_modes(
    exc: Exception, code: str, stream: bool
) -> None:
    proxied, direct = through_the_proxy(exc, stream), directly(exc, stream)
    assert proxied.code == direct.code == code
    assert proxied.recoverable == direct.recoverable
    # What the provider said stays with the operator through the proxy (the server's log),
    # and with the user in direct mode, where the user is the operator.
    status = getattr(exc, "status_code", None)
    assert proxied.details == type(exc).__name__ + (f" (HTTP {status})" if status else "")
    assert direct.details == f"{type(exc).__name__}: {exc}"
    assert MODEL_ID in proxied.message and MODEL_ID in direct.message
    if code == ErrorCode.PROVIDER_TIMEOUT:
        assert proxied.message == direct.message
    if code == ErrorCode.PROVIDER_ERROR:
        assert str(exc) not in proxied.message and "server's log" in proxied.message
    # Only whose key it is differs: the server's (its admin fixes it) or the user's own.
    if code == ErrorCode.PROVIDER_AUTH_ERROR:
        assert "this server's key" in proxied.message and "vibectld admin" in proxied.message
        assert "your key" in direct.message and "vibectld" not in direct.message


def test_timeouts_and_rate_limits_are_the_recoverable_ones() -> None:
    assert directly(TimeoutError("read timed out"), stream=False).recoverable
    assert directly(StatusError(429, "slow down"), stream=False).recoverable
    assert not directly(StatusError(401, "Incorrect API key"), stream=False).recoverable


def test_a_missing_key_in_direct_mode_is_an_auth_error_that_says_how_to_set_it() -> None:
    adapter = LLMModelAdapter()
    with pytest.raises(ModelError) as error:
        asyncio.run(adapter.execute(NeedsAKey(), [], ["hi"]))
    assert error.value.code == ErrorCode.PROVIDER_AUTH_ERROR
    assert "llm keys set nokeyprovider" in error.value.message
    assert "NOKEYPROVIDER_API_KEY" in error.value.message
    assert error.value.details and error.value.details.startswith("NeedsKeyException: ")


def test_the_shared_module_needs_neither_llm_nor_pydantic() -> None:
    """Proxy mode imports it, and proxy mode must start without either."""
    code = (
        "import sys, vibectl.errors, vibectl.model_errors; "
        "print(sorted({'llm', 'pydantic'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
