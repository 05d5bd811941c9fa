"""The ModelAdapter implementations, used as a library against a real daemon and real llm."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
import pytest

from tests.conftest import RunningDaemon
from vibectl.adapters import proxy_adapter
from vibectl.adapters.direct import LLMModelAdapter
from vibectl.adapters.proxy import ProxyModelAdapter
from vibectl.config import Profile
from vibectl.errors import (
    AuthenticationError,
    ConfigurationError,
    InvalidRequestError,
    LimitExceededError,
    ModelError,
    PermissionDeniedError,
    ServerUnavailableError,
)
from vibectl.tls_pin import pinned_in_pem


class Answer(pydantic.BaseModel):
    answer: str
    system: str


def proxy_for(daemon: RunningDaemon, secret: str, **kwargs: Any) -> ProxyModelAdapter:
    return ProxyModelAdapter("localhost", daemon.port, secret, ca_pem=daemon.ca_pem, **kwargs)


def test_execute_stream_and_metrics(daemon: RunningDaemon) -> None:
    adapter = proxy_for(daemon, daemon.issue("alice"))

    async def scenario() -> None:
        model = adapter.get_model("faults")
        text, metrics = await adapter.execute(model, ["sys"], ["hello"])
        assert text == "faults says: hello"
        assert metrics.token_input == 1 and metrics.token_output == 3
        assert metrics.total_tokens == 4 and metrics.latency_ms > 0
        assert metrics.model == "faults"
        chunks = [c async for c in adapter.stream_execute(model, [], ["chunks:3"])]
        assert chunks == ["c0 ", "c1 ", "c2 "]
        await adapter.aclose()

    asyncio.run(scenario())


def test_a_pydantic_response_model_becomes_the_schema(daemon: RunningDaemon) -> None:
    adapter = proxy_for(daemon, daemon.issue("alice"))

    async def scenario() -> str:
        text, _ = await adapter.execute(adapter.get_model("faults"), ["s"], ["q"], Answer)
        await adapter.aclose()
        return text

    assert Answer.model_validate_json(asyncio.run(scenario())) == Answer(answer="q", system="s")


def test_errors_are_typed(daemon: RunningDaemon) -> None:
    # Whether a refused call counts against the rate limit is the server's rule (it does
    # since issue 12); with rpm=2 the last call is over the limit either way.
    secret = daemon.issue("carol", models=["echo", "faults"], rpm=2)

    async def scenario() -> list[Exception]:
        adapter = proxy_for(daemon, secret)
        errors: list[Exception] = []
        for model, prompt in [("faults", "fail"), ("fake-sync", "x"), ("echo", "x"), ("echo", "x")]:
            try:
                await adapter.execute(adapter.get_model(model), [], [prompt])
            except Exception as e:
                errors.append(e)
        await adapter.aclose()
        return errors

    errors = asyncio.run(scenario())
    assert isinstance(errors[0], ModelError) and errors[0].code == "PROVIDER_ERROR"
    assert not errors[0].recoverable
    assert isinstance(errors[1], PermissionDeniedError) and not errors[1].recoverable
    # The last call is over the rpm limit; retry-after (a minute) is too long to wait.
    assert isinstance(errors[-1], LimitExceededError) and errors[-1].recoverable
    assert errors[-1].limit_type == "rpm" and (errors[-1].retry_after_ms or 0) > 5000

    daemon.admin("revoke_client", {"target": "carol"})
    with pytest.raises(AuthenticationError, match="revoked"):
        asyncio.run(proxy_for(daemon, secret).execute("echo", [], ["x"]))


def test_validate_model_name_and_list(daemon: RunningDaemon) -> None:
    adapter = proxy_for(daemon, daemon.issue("dave", models=["echo"]))

    async def scenario() -> tuple[str | None, str | None, list[dict[str, Any]]]:
        ok = await adapter.validate_model_name("echo")
        bad = await adapter.validate_model_name("faults")
        listed = await adapter.list_models()
        await adapter.aclose()
        return ok, bad, listed

    ok, bad, listed = asyncio.run(scenario())
    assert ok is None and bad is not None and "echo" in bad
    assert [m["model_id"] for m in listed] == ["echo"] and listed[0]["default"]
    assert adapter.validate_model_key("echo") is None


def test_unavailable_is_retried_until_the_server_is_back(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    first = start_daemon()
    port, secret, state = first.port, first.issue("alice"), first.config.state_dir
    adapter = proxy_for(first, secret)
    restarted: list[RunningDaemon] = []

    async def scenario() -> tuple[str, float]:
        await adapter.execute("echo", [], ["before"])
        first.stop()

        def restart() -> None:
            time.sleep(0.3)
            restarted.append(start_daemon(state_dir=state, server={"listen": f"127.0.0.1:{port}"}))

        threading.Thread(target=restart).start()
        started = time.monotonic()
        text, _ = await adapter.execute("echo", [], ["after"])
        await adapter.aclose()
        return text, time.monotonic() - started

    text, waited = asyncio.run(scenario())
    assert json.loads(text)["prompt"] == "after"
    assert restarted and waited >= 0.3


def test_a_server_that_never_answers_is_unavailable_within_the_deadline() -> None:
    adapter = ProxyModelAdapter("127.0.0.1", 1, "secret", connect_timeout=0.5)
    with pytest.raises(ServerUnavailableError, match=r"cannot reach vibectld at 127\.0\.0\.1:1"):
        asyncio.run(adapter.execute("echo", [], ["x"]))


def test_direct_adapter_uses_llm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_USER_PATH", str(tmp_path / "llm"))
    adapter = LLMModelAdapter("echo")

    async def scenario() -> tuple[str, list[str]]:
        model = adapter.get_model(None)
        text, metrics = await adapter.execute(model, ["be kind"], ["hi"])
        assert metrics.token_input == 3 and metrics.model == "echo"
        chunks = [c async for c in adapter.stream_execute(model, [], ["there"])]
        return text, chunks

    text, chunks = asyncio.run(scenario())
    assert json.loads(text)["system"] == "be kind"
    assert json.loads("".join(chunks))["prompt"] == "there"
    with pytest.raises(ModelError) as err:
        adapter.get_model("no-such-model")
    assert err.value.code == "MODEL_NOT_FOUND"
    assert asyncio.run(adapter.validate_model_name("echo")) is None
    assert adapter.validate_model_key("echo") is None


def test_only_the_pinned_certificate_of_a_bundle_is_trusted(daemon: RunningDaemon) -> None:
    tls = daemon.config.state_dir / "tls"
    ca, leaf = (tls / "ca.pem").read_bytes(), (tls / "server.pem").read_bytes()
    pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(ca.decode())).hexdigest()
    broken = b"-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----\n"
    found = pinned_in_pem(leaf + b"junk\n" + broken + ca.replace(b"\n", b"\r\n"), pin.upper())
    assert found is not None and found.count(b"BEGIN CERTIFICATE") == 1
    assert hashlib.sha256(ssl.PEM_cert_to_DER_cert(found.decode())).hexdigest() == pin
    assert pinned_in_pem(leaf, pin) is None
    assert pinned_in_pem(b"", pin) is None


def test_a_pinned_profile_is_never_given_the_system_roots() -> None:
    # Defence in depth: whatever a caller passes, a pin without its CA is refused.
    profile = Profile("corp", "bastion.example.com", 50051, ca_sha256="ab" * 32)
    with pytest.raises(ConfigurationError, match="system"):
        proxy_adapter(profile, "secret", None)


def test_a_request_too_large_for_the_transport_is_invalid_not_a_limit(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    """gRPC's own receive limit answers RESOURCE_EXHAUSTED without a limit-type: that is no
    limit a later retry can pass, so the client says "too large" (exit 65), not "retry"."""
    daemon = start_daemon(server={"max_request_bytes": 1024})
    adapter = proxy_for(daemon, daemon.issue("alice"))

    async def scenario() -> None:
        try:
            with pytest.raises(InvalidRequestError, match="too large") as refused:
                await adapter.execute(adapter.get_model("echo"), [], ["x" * 200_000])
            assert refused.value.exit_code == 65 and not refused.value.recoverable
        finally:
            await adapter.aclose()

    asyncio.run(scenario())
