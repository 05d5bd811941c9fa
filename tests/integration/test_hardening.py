"""What a hostile or careless client can no longer do (issue 12), against a real daemon.

Each test reproduces an attack or a mistake over real TLS and real sockets:
refusing a bad secret before reading the message, gRPC's receive limit, the
server-wide cap on calls, the TLS handshake timeout, the contract's order of
checks (request_id shape, rate limit before everything else), the same answer
for an unknown and a forbidden model, response schemas that are too deep or too
long, provider error text kept out of replies, failed authentications
logged once per peer, and a changed issuer or audience refusing every older secret
on its next call, in one process and across workers.
"""

from __future__ import annotations

import json
import selectors
import socket
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog.testing
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import RunningDaemon, admin_cli
from tests.integration.conftest import write
from tests.integration.test_reload import base_config
from tests.integration.test_workers import call
from tests.reliability._procs import DaemonProcess
from vibectl._proto import llm_proxy_pb2 as pb
from vibectld.service.gate import FailedAuthLog

EXECUTE = "/vibectl.llm_proxy.VibectlLLMProxy/Execute"


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def request(prompt: str = "hi", model: str | None = None, **fields: Any) -> pb.ExecuteRequest:
    req = pb.ExecuteRequest(user_fragments=[prompt], **fields)
    if model is not None:
        req.model_name = model
    return req


def refused(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value


def raw_execute(daemon: RunningDaemon) -> grpc.UnaryUnaryMultiCallable:
    """Execute with the request as raw bytes: what a hostile client may send."""
    return daemon.channel().unary_unary(EXECUTE)


@contextmanager
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as records:
        yield records


def wait_for(
    records: list[MutableMapping[str, Any]], match: Callable[[MutableMapping[str, Any]], bool]
) -> None:
    """Request records are written just after the reply; wait for the one we expect."""
    deadline = time.monotonic() + 5
    while not any(match(r) for r in records):
        assert time.monotonic() < deadline, records
        time.sleep(0.01)


# -- refused before the message is read ---------------------------------------------------


def test_a_bad_secret_is_refused_without_reading_the_message(daemon: RunningDaemon) -> None:
    execute = raw_execute(daemon)
    # Not a protobuf message at all: had it been read, it would fail to deserialize.
    garbage = refused(lambda: execute(b"\xff\xff\xff\xff", metadata=auth("x"), timeout=10))
    assert garbage.code() == grpc.StatusCode.UNAUTHENTICATED
    # Past gRPC's receive limit: had it been read, gRPC would refuse it as too large.
    big = request("x" * (6 * 1024 * 1024)).SerializeToString()
    too_big = refused(lambda: execute(big, metadata=auth("x"), timeout=30))
    assert too_big.code() == grpc.StatusCode.UNAUTHENTICATED
    nothing = refused(lambda: execute(big, timeout=30))
    assert nothing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "no client secret" in (nothing.details() or "")
    # Streams are refused the same way.
    stream = daemon.channel().unary_stream("/vibectl.llm_proxy.VibectlLLMProxy/StreamExecute")
    streamed = refused(lambda: list(stream(b"\xff\xff", metadata=auth("x"), timeout=10)))
    assert streamed.code() == grpc.StatusCode.UNAUTHENTICATED
    # The health service stays open to callers without a secret.
    health = health_pb2_grpc.HealthStub(daemon.channel())
    check = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    secret = daemon.issue("alice")
    assert daemon.stub().Execute(request(), metadata=auth(secret), timeout=10).success


def test_grpcs_receive_limit_is_close_to_max_request_bytes(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(server={"max_request_bytes": 100_000})
    secret = daemon.issue("alice")
    stub = daemon.stub()
    # Just over the limit: the service itself says what to do.
    over = refused(lambda: stub.Execute(request("x" * 110_000), metadata=auth(secret), timeout=10))
    assert over.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 100000" in (over.details() or "")
    # Far over it (but under the old 4x): gRPC refuses it without handing it to the service.
    far = refused(lambda: stub.Execute(request("x" * 300_000), metadata=auth(secret), timeout=10))
    assert far.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit-type" not in dict(far.trailing_metadata() or ())
    assert stub.Execute(request("x" * 90_000), metadata=auth(secret), timeout=10).success


def test_the_server_wide_cap_on_calls_and_streams(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(server={"max_concurrent_calls": 3})
    secrets = [daemon.issue(name) for name in ("a", "b", "c", "d")]
    stub = daemon.stub()
    held = request("chunks:300", model="faults")
    streams = [stub.StreamExecute(held, metadata=auth(s), timeout=30) for s in secrets[:3]]
    for stream in streams:
        assert next(stream).text_chunk == "c0 "
    full = refused(lambda: stub.Execute(request(), metadata=auth(secrets[3]), timeout=10))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailers = dict(full.trailing_metadata() or ())
    assert trailers["limit-type"] == "server"
    assert int(trailers["retry-after-ms"]) > 0
    # The health check is not counted, so a full server still reports serving.
    health = health_pb2_grpc.HealthStub(daemon.channel())
    check = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    # A stream that ends (here: cancelled by its client) frees its place.
    streams[0].cancel()
    deadline = time.monotonic() + 10
    while True:
        try:
            stub.Execute(request(), metadata=auth(secrets[3]), timeout=10)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() < deadline, "the cancelled stream never freed its place"
            time.sleep(0.05)
    for stream in streams[1:]:
        list(stream)
    # All places are free again.
    replies = [stub.Execute(request(), metadata=auth(s), timeout=10) for s in secrets]
    assert all(r.success for r in replies)


@pytest.mark.timeout(90)
def test_silent_connections_are_closed_after_the_handshake_timeout(
    daemon: RunningDaemon,
) -> None:
    """300 TCP connections that never start TLS: closed after about 10 s (gRPC: 120 s)."""
    started = time.monotonic()
    sel = selectors.DefaultSelector()
    socks = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        socks.append(sock)
    closed: list[float] = []
    try:
        while len(closed) < len(socks) and time.monotonic() - started < 40:
            for key, _ in sel.select(timeout=1):
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                try:
                    data = conn.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    closed.append(time.monotonic() - started)
                    sel.unregister(conn)
    finally:
        sel.close()
        for sock in socks:
            sock.close()
    assert len(closed) == 300, f"{len(closed)} of 300 closed within 40 s"
    print(f"\n300 silent connections closed after {min(closed):.1f}-{max(closed):.1f} s")
    assert min(closed) > 8 and max(closed) < 20
    secret = daemon.issue("alice")
    assert daemon.stub().Execute(request(), metadata=auth(secret), timeout=10).success


# -- the contract's order of checks ---------------------------------------------------------


def test_request_id_is_checked_before_it_is_logged(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice", rpm=2)
    stub = daemon.stub()
    huge = "r" * 900_000
    with logs() as records:
        for rid in (huge, "x" * 65, "spaces are not allowed", "new\nline", "é"):
            bad = refused(
                lambda rid=rid: stub.Execute(  # type: ignore[misc]
                    request(model="no-such-model", request_id=rid),
                    metadata=auth(secret),
                    timeout=10,
                )
            )
            assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request_id" in (bad.details() or "") and rid not in (bad.details() or "")
        time.sleep(0.2)
    assert all(huge not in json.dumps(r, default=str) for r in records)
    assert sum(len(json.dumps(r, default=str)) for r in records) < 10_000
    # The shape of request_id comes before the rate limit (the contract's order), so those
    # calls did not count: two calls of rpm=2 are left, and the third is over it.
    for _ in range(2):
        assert stub.Execute(request(), metadata=auth(secret), timeout=10).success
    over = refused(lambda: stub.Execute(request(), metadata=auth(secret), timeout=10))
    assert dict(over.trailing_metadata() or ())["limit-type"] == "rpm"
    # An id of the allowed shape comes back; an empty one is made up by the server.
    other = daemon.issue("bob")
    rid = "Aa0._:-" + "z" * 57
    assert len(rid) == 64
    assert stub.Execute(request(request_id=rid), metadata=auth(other), timeout=10).request_id == rid
    made = stub.Execute(request(), metadata=auth(other), timeout=10).request_id
    assert len(made) == 32 and made.isalnum()


def test_every_authenticated_call_counts_against_the_rate_limit(daemon: RunningDaemon) -> None:
    secret = daemon.issue("mallory", rpm=4)
    restricted = daemon.issue("trent", rpm=1, models=["echo"])
    stub = daemon.stub()
    # An unknown model (in-band MODEL_NOT_FOUND for a client without a list) and bad input.
    unknown = stub.Execute(request(model="no-such-model"), metadata=auth(secret), timeout=10)
    assert unknown.error.error_code == "MODEL_NOT_FOUND"
    no_prompt = pb.ExecuteRequest(user_fragments=[" "])
    assert refused(lambda: stub.Execute(no_prompt, metadata=auth(secret), timeout=10)).code() == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    bad_schema = request(response_model_schema="{nope")
    assert refused(lambda: stub.Execute(bad_schema, metadata=auth(secret), timeout=10)).code() == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert stub.Execute(request(), metadata=auth(secret), timeout=10).success
    # Four calls so far: the fifth is over rpm=4, whatever it asks for.
    for req in (request(), request(model="no-such-model"), no_prompt):
        over = refused(lambda req=req: stub.Execute(req, metadata=auth(secret), timeout=10))  # type: ignore[misc]
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(over.trailing_metadata() or ())["limit-type"] == "rpm"
    # A model the client may not use counts too.
    denied = refused(
        lambda: stub.Execute(request(model="faults"), metadata=auth(restricted), timeout=10)
    )
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    after = refused(lambda: stub.Execute(request(), metadata=auth(restricted), timeout=10))
    assert dict(after.trailing_metadata() or ())["limit-type"] == "rpm"


def test_a_refused_call_uses_no_token_budget(daemon: RunningDaemon) -> None:
    secret = daemon.issue("erin", tokens_per_day=1_000_000, models=["echo"])
    stub = daemon.stub()
    for req in (request(model="faults"), request(request_id="bad id"), request("")):
        refused(lambda req=req: stub.Execute(req, metadata=auth(secret), timeout=10))  # type: ignore[misc]
    registry = daemon.runtime.registry
    assert registry.tokens_used(registry.find("erin").id, int(time.time())) == 0
    # A served call does use it (counted just after its reply).
    assert stub.Execute(request(model="echo"), metadata=auth(secret), timeout=10).success
    deadline = time.monotonic() + 5
    while registry.tokens_used(registry.find("erin").id, int(time.time())) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)


# -- models: the same answer for unknown and forbidden ---------------------------------------


def test_unknown_and_forbidden_models_get_the_same_answer(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(models={"default": "faults", "aliases": {"secret-alias": "fake-sync"}})
    secret = daemon.issue("carol", models=["echo"])
    stub = daemon.stub()
    answers = {}
    for name in ("fake-sync", "hr-finetune-secret", "secret-alias", None):
        err = refused(
            lambda name=name: stub.Execute(  # type: ignore[misc]
                request(model=name), metadata=auth(secret), timeout=10
            )
        )
        answers[name] = (err.code(), err.details())
    assert len(set(answers.values())) == 1, answers
    code, details = answers[None]
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "echo" in (details or "")
    for other in ("fake-sync", "faults", "hr-finetune-secret", "secret-alias"):
        assert other not in (details or "")
    stream = refused(
        lambda: list(stub.StreamExecute(request(model="nope"), metadata=auth(secret), timeout=10))
    )
    assert (stream.code(), stream.details()) == answers[None]
    assert stub.Execute(request(model="echo"), metadata=auth(secret), timeout=10).success
    # A client without a list keeps the helpful in-band answer.
    free = daemon.issue("dave")
    reply = stub.Execute(request(model="gpt-9"), metadata=auth(free), timeout=10)
    assert reply.error.error_code == "MODEL_NOT_FOUND"
    assert "faults" in reply.error.error_message


# -- response schemas ---------------------------------------------------------------------


def test_a_schema_nested_too_deeply_is_invalid_argument(daemon: RunningDaemon) -> None:
    secret = daemon.issue("alice")
    stub = daemon.stub()
    beyond_python = '{"a": ' + "[" * 20_000 + "]" * 20_000 + "}"
    beyond_ours = '{"a": ' + "[" * 70 + "]" * 70 + "}"
    for schema in (beyond_python, beyond_ours):
        err = refused(
            lambda schema=schema: stub.Execute(  # type: ignore[misc]
                request(model="faults", response_model_schema=schema),
                metadata=auth(secret),
                timeout=10,
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert "nested" in (err.details() or "")
    fine = {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string"}}}}
    reply = stub.Execute(
        request(model="faults", response_model_schema=json.dumps(fine)),
        metadata=auth(secret),
        timeout=10,
    )
    assert reply.success


def test_a_schema_counts_toward_max_input_chars(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(limits={"max_input_chars": 1000})
    secret = daemon.issue("alice")
    schema = json.dumps({"type": "object", "description": "d" * 1500})
    err = refused(
        lambda: daemon.stub().Execute(
            request("short", model="faults", response_model_schema=schema),
            metadata=auth(secret),
            timeout=10,
        )
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 1000" in (err.details() or "")


# -- what the client is told, what the log keeps ------------------------------------------------


def test_provider_connection_targets_stay_in_the_log(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    endpoint = {"model_id": "down", "model_name": "m", "api_base": "http://127.0.0.1:9/v1"}
    daemon = start_daemon(models={"default": "echo", "openai_compatible": [endpoint]})
    secret = daemon.issue("alice")
    stub = daemon.stub()
    with logs() as records:
        reply = stub.Execute(request(model="down", request_id="r-9"), metadata=auth(secret))
        chunks = list(stub.StreamExecute(request(model="down"), metadata=auth(secret)))
        wait_for(records, lambda r: r.get("request_id") == "r-9")
    for error in (reply.error, chunks[-1].error):
        assert error.error_code == "PROVIDER_ERROR"
        told = error.error_message + error.error_details
        assert "127.0.0.1" not in told and ":9" not in told, told
        assert "down" in error.error_message
    [logged] = [r for r in records if r.get("request_id") == "r-9"]
    assert "127.0.0.1:9" in logged["provider_error"]


def test_failed_authentications_are_logged_once_per_peer(daemon: RunningDaemon) -> None:
    stub = daemon.stub()
    forged = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    with logs() as records:
        for token in ["x"] * 20 + [forged] * 5:
            refused(lambda token=token: stub.Execute(request(), metadata=auth(token), timeout=10))  # type: ignore[misc]
        refused(lambda: stub.Execute(request(), timeout=10))
    refusals = [r for r in records if r["event"] == "auth.refused"]
    assert len(refusals) == 1, refusals
    [record] = refusals
    assert record["peer"].startswith("ipv4:127.0.0.1:") or record["peer"].startswith("ipv6:")
    assert "malformed" in record["reason"]
    assert all(forged not in json.dumps(r, default=str) for r in records)


def test_the_failed_auth_log_counts_what_it_suppressed() -> None:
    now = [0.0]
    log = FailedAuthLog(period=60, max_peers=2, clock=lambda: now[0])
    with logs() as records:
        for _ in range(5):
            log.refused("ipv4:10.0.0.1:1111", "bad")
        log.refused("ipv4:10.0.0.2:2222", "bad")
        log.refused("ipv4:10.0.0.3:3333", "bad")  # a third peer in the minute: dropped
        now[0] = 61
        log.refused("ipv4:10.0.0.1:4444", "bad")
    assert [(r["peer"], r["suppressed"], r["suppressed_other_peers"]) for r in records] == [
        ("ipv4:10.0.0.1:1111", 0, 0),
        ("ipv4:10.0.0.2:2222", 0, 0),
        ("ipv4:10.0.0.1:4444", 4, 1),
    ]


# -- a policy change outlives no cached verification (item 4) -----------------------------


@pytest.mark.parametrize("key", ["issuer", "audience"])
def test_a_new_issuer_or_audience_refuses_older_secrets_on_their_next_call(
    from_file: Callable[[dict[str, Any]], tuple[RunningDaemon, Path]],
    tmp_path: Path,
    sock_dir: Path,
    key: str,
) -> None:
    raw = base_config(tmp_path, sock_dir)
    daemon, path = from_file(raw)
    secret = daemon.issue("alice")
    stub = daemon.stub()
    # Verified, and so cached, on the connection it will use again after the reload.
    assert stub.Execute(request(), metadata=auth(secret), timeout=10).success
    write(path, {**raw, "clients": {key: f"another-{key}"}})
    assert admin_cli(daemon, "reload", "--wait").returncode == 0
    for call_it in (
        lambda: stub.Execute(request(), metadata=auth(secret), timeout=10),
        lambda: list(stub.StreamExecute(request(), metadata=auth(secret), timeout=10)),
    ):
        old = refused(call_it)
        assert old.code() == grpc.StatusCode.UNAUTHENTICATED, old
        assert {"issuer": "(iss)", "audience": "(aud)"}[key] in (old.details() or ""), old
    assert stub.Execute(request(), metadata=auth(daemon.issue("bob")), timeout=10).success


@pytest.mark.timeout(300)
def test_every_worker_forgets_secrets_verified_under_the_old_issuer(tmp_path: Path) -> None:
    """Each worker caches what it verified; a reload empties every worker's cache."""
    with DaemonProcess(tmp_path, fake_models=True, server={"workers": 2}) as daemon:
        daemon.start()
        secret = daemon.issue("alice")
        # A connection each: the kernel spreads them over both workers, which cache the
        # secret; how many landed on each is in `status`, not assumed.
        before = [call(daemon, secret) for _ in range(12)]
        assert before == ["OK"] * 12
        daemon.raw["clients"] = {"issuer": "another-issuer"}
        daemon.write_config()
        daemon.admin("reload", {"wait": True})
        after = [call(daemon, secret) for _ in range(12)]
        assert after == ["UNAUTHENTICATED"] * 12
        assert call(daemon, daemon.issue("bob")) == "OK"
