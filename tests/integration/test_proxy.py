"""The proxy protocol end to end: a real daemon over TLS, real secrets, real llm models."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import RunningDaemon
from vibectl._proto import llm_proxy_pb2 as pb


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def request(
    *user: str, model: str | None = None, system: tuple[str, ...] = ()
) -> pb.ExecuteRequest:
    req = pb.ExecuteRequest(
        user_fragments=list(user), system_fragments=list(system), request_id="r1"
    )
    if model is not None:
        req.model_name = model
    return req


def test_execute_returns_the_reply_with_metrics(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    reply = daemon.stub().Execute(
        request("hello there", system=("be brief",)), metadata=auth(secret), timeout=10
    )
    assert reply.request_id == "r1"
    assert reply.WhichOneof("result") == "success"
    echoed = json.loads(reply.success.response_text)
    # System fragments are the system prompt and never flattened into the prompt.
    assert echoed["prompt"] == "hello there"
    assert echoed["system"] == "be brief"
    assert reply.success.actual_model_used == "echo"
    metrics = reply.success.metrics
    assert metrics.input_tokens == 4 and metrics.output_tokens > 0
    assert metrics.total_tokens == metrics.input_tokens + metrics.output_tokens
    assert metrics.timestamp > 0


def test_stream_sends_chunks_then_complete_then_metrics(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    chunks = list(
        daemon.stub().StreamExecute(
            request("chunks:5", model="faults"), metadata=auth(secret), timeout=10
        )
    )
    kinds = [c.WhichOneof("chunk_type") for c in chunks]
    assert kinds == ["text_chunk"] * 5 + ["complete", "final_metrics"]
    assert "".join(c.text_chunk for c in chunks) == "c0 c1 c2 c3 c4 "
    assert chunks[5].complete.actual_model_used == "faults"
    assert chunks[6].final_metrics.output_tokens == 3


def test_sync_only_model_runs_in_the_thread_pool(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    stub = daemon.stub()
    reply = stub.Execute(request("one two", model="fake-sync"), metadata=auth(secret), timeout=10)
    assert reply.success.response_text == "one two "
    chunks = list(
        stub.StreamExecute(request("a b c", model="fake-sync"), metadata=auth(secret), timeout=10)
    )
    # The words arrive together, so they may come as fewer, larger chunks.
    kinds = [c.WhichOneof("chunk_type") for c in chunks]
    texts = kinds.count("text_chunk")
    assert kinds == ["text_chunk"] * texts + ["complete", "final_metrics"]
    assert "".join(c.text_chunk for c in chunks[:texts]) == "a b c "


def test_alias_and_schema(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    req = request("question", model="faulty")
    req.response_model_schema = json.dumps({"type": "object", "properties": {"answer": {}}})
    reply = daemon.stub().Execute(req, metadata=auth(secret), timeout=10)
    assert json.loads(reply.success.response_text) == {"answer": "question", "system": ""}
    assert reply.success.actual_model_used == "faults"


def test_schema_on_a_model_without_schema_support_is_in_band(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    req = request("question")
    req.response_model_schema = json.dumps({"type": "object"})
    reply = daemon.stub().Execute(req, metadata=auth(secret), timeout=10)
    assert reply.error.error_code == "SCHEMA_NOT_SUPPORTED"


def test_get_server_info(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    info = daemon.stub().GetServerInfo(pb.GetServerInfoRequest(), metadata=auth(secret), timeout=10)
    ids = {m.model_id for m in info.available_models}
    assert {"echo", "fake-sync", "faults"} <= ids
    assert info.default_model == "echo"
    assert info.model_aliases["faulty"] == "faults"
    assert info.server_name == "test-server"
    assert info.server_version
    assert info.limits.request_timeout_seconds == 120
    assert info.limits.max_input_length == 200_000


def test_server_info_lists_only_the_clients_models(daemon: RunningDaemon) -> None:
    secret = daemon.issue("carol", models=["echo"], rpm=7)
    info = daemon.stub().GetServerInfo(pb.GetServerInfoRequest(), metadata=auth(secret), timeout=10)
    assert [m.model_id for m in info.available_models] == ["echo"]
    assert info.limits.max_requests_per_minute == 7


def test_health_service_reports_serving(daemon: RunningDaemon) -> None:
    health = health_pb2_grpc.HealthStub(daemon.channel())
    for service in ("", "vibectl.llm_proxy.VibectlLLMProxy"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_model_is_reported_in_band_with_the_choices(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    reply = daemon.stub().Execute(request("hi", model="gpt-9"), metadata=auth(secret), timeout=10)
    assert reply.error.error_code == "MODEL_NOT_FOUND"
    assert "gpt-9" in reply.error.error_message and "echo" in reply.error.error_message


@pytest.mark.parametrize(
    ("prompt", "code"),
    [
        ("fail", "PROVIDER_ERROR"),
        ("ratelimit", "PROVIDER_RATE_LIMITED"),
        ("timeout", "PROVIDER_TIMEOUT"),
    ],
)
def test_provider_failures_are_in_band_and_the_daemon_keeps_serving(
    daemon: RunningDaemon, prompt: str, code: str
) -> None:
    secret = daemon.issue("alice")
    stub = daemon.stub()
    reply = stub.Execute(request(prompt, model="faults"), metadata=auth(secret), timeout=10)
    assert reply.error.error_code == code
    chunks = list(
        stub.StreamExecute(request(prompt, model="faults"), metadata=auth(secret), timeout=10)
    )
    assert chunks[-1].error.error_code == code
    assert stub.Execute(request("ok"), metadata=auth(secret), timeout=10).success.response_text


def test_server_side_request_timeout(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon(limits={"request_timeout_seconds": 1})
    secret = daemon.issue("alice")
    reply = daemon.stub().Execute(
        request("sleep:5", model="faults"), metadata=auth(secret), timeout=10
    )
    assert reply.error.error_code == "PROVIDER_TIMEOUT"
    assert "1 s" in reply.error.error_message


def test_bad_requests_are_invalid_argument(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon(server={"max_request_bytes": 2000}, limits={"max_input_chars": 1500})
    secret = daemon.issue("alice")
    stub = daemon.stub()
    cases = {
        "bytes": request("x" * 3000),
        "characters": request("x" * 1600),
        "no prompt": request(),
    }
    bad_schema = request("hi")
    bad_schema.response_model_schema = "{not json"
    cases["not valid JSON"] = bad_schema
    for expected, req in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            stub.Execute(req, metadata=auth(secret), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in err.value.details()
    assert stub.Execute(request("fine"), metadata=auth(secret), timeout=10).success


def test_model_outside_the_clients_list_is_permission_denied(daemon: RunningDaemon) -> None:
    secret = daemon.issue("carol", models=["echo"])
    with pytest.raises(grpc.RpcError) as err:
        daemon.stub().Execute(request("hi", model="faults"), metadata=auth(secret), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "echo" in err.value.details()


def test_rate_limit_is_exact_and_says_when_to_retry(daemon: RunningDaemon) -> None:
    secret = daemon.issue("dave", rpm=3)
    stub = daemon.stub()
    served, refused = 0, []
    for _ in range(5):
        try:
            stub.Execute(request("hi"), metadata=auth(secret), timeout=10)
            served += 1
        except grpc.RpcError as e:
            refused.append(e)
    assert served == 3 and len(refused) == 2
    trailers = dict(refused[0].trailing_metadata())
    assert refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert trailers["limit-type"] == "rpm"
    assert 0 < int(trailers["retry-after-ms"]) <= 60_000


def test_revocation_applies_to_the_next_call(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    other = daemon.issue("bob")
    stub = daemon.stub()
    assert stub.Execute(request("hi"), metadata=auth(secret), timeout=10).success
    daemon.admin("revoke_client", {"target": "alice"})
    with pytest.raises(grpc.RpcError) as err:
        stub.Execute(request("hi"), metadata=auth(secret), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in err.value.details()
    assert stub.Execute(request("hi"), metadata=auth(other), timeout=10).success


def test_revocation_cancels_open_streams(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    stream = daemon.stub().StreamExecute(
        request("chunks:1000", model="faults"), metadata=auth(secret), timeout=30
    )
    first = next(stream)
    assert first.text_chunk == "c0 "
    revoked = threading.Event()

    def revoke() -> None:
        reply = daemon.admin("revoke_client", {"target": "alice"})
        assert reply["cancelled_calls"] == 1
        revoked.set()

    threading.Thread(target=revoke).start()
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        for _ in stream:
            pass
    assert revoked.wait(5)
    # UNAUTHENTICATED, unless the cancel lands while gRPC itself is writing a chunk.
    assert err.value.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.CANCELLED)
    assert time.monotonic() - started < 5
    assert daemon.runtime.inflight.total() == 0


def test_secrets_survive_a_restart_and_revocations_stay(
    start_daemon: Callable[..., RunningDaemon], tmp_path: object
) -> None:
    first = start_daemon()
    kept, dropped = first.issue("alice"), first.issue("bob")
    first.admin("revoke_client", {"target": "bob"})
    ca = first.ca_pem
    state_dir = first.config.state_dir
    first.stop()
    second = start_daemon(state_dir=state_dir)
    assert second.ca_pem == ca
    stub = second.stub()
    assert stub.Execute(request("hi"), metadata=auth(kept), timeout=10).success
    with pytest.raises(grpc.RpcError) as err:
        stub.Execute(request("hi"), metadata=auth(dropped), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_requests_are_counted(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    stub = daemon.stub()
    for _ in range(3):
        stub.Execute(request("hi"), metadata=auth(secret), timeout=10)
    clients = daemon.admin("list_clients", {})["clients"]
    assert clients[0]["requests"] == 3 and clients[0]["last_seen_at"]
