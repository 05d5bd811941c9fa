"""Per-client limits, allow-lists, usage accounting, metrics and audit, through real connections."""

from __future__ import annotations

import json
import sys
import threading
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from tests.conftest import RunningDaemon
from tests.conftest import admin_cli as admin
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

BIN = Path(sys.executable).parent
Outcome = tuple[str, dict[str, str], pb.ExecuteResponse | None]


def issue(daemon: RunningDaemon, name: str, *flags: str) -> str:
    out = admin(daemon, "issue-client", name, *flags)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split("://", 1)[1].split("@", 1)[0]


def call(
    daemon: RunningDaemon, secret: str, prompt: str = "hi", model: str | None = None
) -> Outcome:
    """One Execute on its own channel (its own connection); never raises."""
    request = pb.ExecuteRequest(user_fragments=[prompt])
    if model:
        request.model_name = model
    with grpc.secure_channel(
        f"localhost:{daemon.port}", grpc.ssl_channel_credentials(daemon.ca_pem)
    ) as channel:
        stub = pb_grpc.VibectlLLMProxyStub(channel)
        try:
            reply = stub.Execute(
                request, metadata=[("authorization", f"Bearer {secret}")], timeout=30
            )
        except grpc.RpcError as e:
            return e.code().name, dict(e.trailing_metadata() or ()), None
    return "OK", {}, reply


def burst(
    daemon: RunningDaemon, secret: str, n: int, prompt: str = "hi", model: str | None = None
) -> list[Outcome]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: call(daemon, secret, prompt, model), range(n)))


def test_carol_rpm_5_of_12_rapid_calls(daemon: RunningDaemon) -> None:
    secret = issue(daemon, "carol", "--rpm", "5", "--models", "echo")
    outcomes = burst(daemon, secret, 12)
    codes = [code for code, _, _ in outcomes]
    assert codes.count("OK") == 5 and codes.count("RESOURCE_EXHAUSTED") == 7
    for code, trailers, _ in outcomes:
        if code == "RESOURCE_EXHAUSTED":
            assert trailers["limit-type"] == "rpm"
            assert 0 < int(trailers["retry-after-ms"]) <= 60_000
    # The rate limit comes before the model is authorized: over it, every call is refused
    # for rpm, whatever it asks for.
    code, trailers, _ = call(daemon, secret, model="faults")
    assert (code, trailers["limit-type"]) == ("RESOURCE_EXHAUSTED", "rpm")
    usage = json.loads(admin(daemon, "--json", "usage", "carol").stdout)
    assert [(u["name"], u["requests"]) for u in usage] == [("carol", 5)]
    audit = admin(daemon, "audit")
    assert audit.returncode == 0
    assert "issue-client" in audit.stdout and "carol" in audit.stdout and "root" in audit.stdout


def test_concurrency_is_exact_and_streams_count_until_they_end(daemon: RunningDaemon) -> None:
    secret = issue(daemon, "dora", "--concurrency", "2")
    outcomes = burst(daemon, secret, 6, prompt="sleep:1", model="faults")
    codes = [code for code, _, _ in outcomes]
    assert codes.count("OK") == 2 and codes.count("RESOURCE_EXHAUSTED") == 4
    assert {t["limit-type"] for c, t, _ in outcomes if c != "OK"} == {"concurrency"}

    stub = daemon.stub()
    auth = [("authorization", f"Bearer {secret}")]
    request = pb.ExecuteRequest(user_fragments=["chunks:200"], model_name="faults")
    streams = [stub.StreamExecute(request, metadata=auth, timeout=30) for _ in range(2)]
    for stream in streams:
        assert next(stream).text_chunk == "c0 "
    assert call(daemon, secret)[0] == "RESOURCE_EXHAUSTED"
    for stream in streams:
        list(stream)
    assert call(daemon, secret)[0] == "OK"


def test_token_budget_refuses_the_call_that_would_start_over_it(daemon: RunningDaemon) -> None:
    secret = issue(daemon, "erin", "--tokens-per-day", "12")
    spent = 0
    served = 0
    while True:
        code, trailers, reply = call(daemon, secret, "a b c d e")
        if code != "OK":
            break
        assert reply is not None
        spent += reply.success.metrics.total_tokens
        served += 1
    assert code == "RESOURCE_EXHAUSTED" and trailers["limit-type"] == "tokens"
    assert 0 < int(trailers["retry-after-ms"]) <= 86_400_000
    assert spent >= 12 and served >= 1
    [row] = json.loads(admin(daemon, "--json", "usage", "erin").stdout)
    assert row["requests"] == served
    assert row["input_tokens"] + row["output_tokens"] == spent


def test_accounting_equals_the_sum_of_served_calls(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(
        models={"default": "echo", "prices": {"echo": {"input": 1000, "output": 2000}}}
    )
    secrets = {"fay": issue(daemon, "fay"), "gus": issue(daemon, "gus", "--rpm", "7")}
    totals: dict[str, list[int]] = {}
    for name, secret in secrets.items():
        served = [r for c, _, r in burst(daemon, secret, 16, "one two three") if r is not None]
        totals[name] = [
            len(served),
            sum(r.success.metrics.input_tokens for r in served),
            sum(r.success.metrics.output_tokens for r in served),
        ]
        assert all(r.success.metrics.HasField("cost_usd") for r in served)
    usage = {u["name"]: u for u in json.loads(admin(daemon, "--json", "usage").stdout)}
    for name, (requests, tokens_in, tokens_out) in totals.items():
        row = usage[name]
        assert (row["requests"], row["input_tokens"], row["output_tokens"]) == (
            requests,
            tokens_in,
            tokens_out,
        )
        assert row["cost_usd"] == pytest.approx((tokens_in * 1000 + tokens_out * 2000) / 1e6)
    assert totals["gus"][0] == 7
    listed = {c["name"]: c for c in json.loads(admin(daemon, "--json", "list-clients").stdout)}
    assert listed["fay"]["requests"] == 16 and listed["fay"]["last_seen_at"]


def test_errors_are_counted(daemon: RunningDaemon) -> None:
    secret = issue(daemon, "hal")
    call(daemon, secret, "fail", model="faults")
    call(daemon, secret, "ok", model="faults")
    [row] = json.loads(admin(daemon, "--json", "usage", "hal").stdout)
    assert (row["requests"], row["errors"]) == (2, 1)


def test_update_client_applies_to_the_next_request(daemon: RunningDaemon) -> None:
    secret = issue(daemon, "ivy")
    assert call(daemon, secret, model="faults")[0] == "OK"
    out = admin(daemon, "update-client", "ivy", "--models", "echo", "--rpm", "2")
    assert out.returncode == 0, out.stderr
    assert "models=echo" in out.stdout and "rpm=2" in out.stdout
    assert call(daemon, secret, model="faults")[0] == "PERMISSION_DENIED"
    # The refused call counted against the new rpm of 2, as every authenticated call does.
    assert call(daemon, secret)[0] == "OK"
    assert call(daemon, secret)[0] == "RESOURCE_EXHAUSTED"
    back = admin(daemon, "--json", "update-client", "ivy", "--models", "all", "--rpm", "default")
    assert json.loads(back.stdout)["models"] is None and json.loads(back.stdout)["rpm"] is None
    assert call(daemon, secret, model="faults")[0] == "OK"


def test_update_client_refuses_bad_input(daemon: RunningDaemon) -> None:
    issue(daemon, "jay")
    assert admin(daemon, "update-client", "jay", "--rpm", "-3").returncode == 2
    assert admin(daemon, "update-client", "jay", "--rpm", "99999999999").returncode == 2
    unknown = admin(daemon, "update-client", "jay", "--models", "echo,gpt-9")
    assert unknown.returncode == 2 and "gpt-9" in unknown.stderr
    assert admin(daemon, "update-client", "jay").returncode == 2
    admin(daemon, "revoke-client", "jay")
    revoked = admin(daemon, "update-client", "jay", "--rpm", "5")
    assert revoked.returncode == 1 and "revoked" in revoked.stderr
    assert admin(daemon, "issue-client", "kim", "--rpm", "0").returncode == 2


def test_audit_lists_changes_with_the_caller(daemon: RunningDaemon) -> None:
    issue(daemon, "lee")
    admin(daemon, "update-client", "lee", "--rpm", "3")
    admin(daemon, "revoke-client", "lee")
    admin(daemon, "revoke-client", "nobody")
    entries = json.loads(admin(daemon, "--json", "audit").stdout)
    ops = [(e["op"], e["target"], e["outcome"]) for e in entries]
    assert ops == [
        ("issue_client", "lee", "ok"),
        ("update_client", "lee", "ok"),
        ("revoke_client", "lee", "ok"),
        ("revoke_client", "nobody", "failed:not_found"),
    ]
    assert {e["caller_user"] for e in entries} == {"root"}
    assert all(e["caller_uid"] == 0 for e in entries)


def test_status_shows_load_per_client(daemon: RunningDaemon) -> None:
    secret = issue(daemon, "max")
    stub = daemon.stub()
    stream = stub.StreamExecute(
        pb.ExecuteRequest(user_fragments=["chunks:200"], model_name="faults"),
        metadata=[("authorization", f"Bearer {secret}")],
        timeout=30,
    )
    next(stream)
    status = json.loads(admin(daemon, "--json", "status").stdout)
    assert status["in_flight_by_client"] == {"max": 1}
    list(stream)
    status = json.loads(admin(daemon, "--json", "status").stdout)
    assert status["top_today"][0]["name"] == "max"


def test_metrics_are_scraped_over_http(start_daemon: Callable[..., RunningDaemon]) -> None:
    daemon = start_daemon(metrics={"listen": "127.0.0.1:0"})
    secret = issue(daemon, "ned", "--rpm", "1")
    call(daemon, secret)
    call(daemon, secret)
    port = daemon.runtime.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    assert 'vibectld_requests_total{client="ned",model="echo",outcome="ok"} 1.0' in text
    assert 'vibectld_refusals_total{reason="rpm"} 1.0' in text
    assert "vibectld_in_flight 0.0" in text
    assert 'vibectld_request_duration_seconds_count{model="echo"} 1.0' in text
    assert 'vibectld_tokens_total{client="ned",direction="input",model="echo"}' in text


def test_a_hammering_client_does_not_starve_another(daemon: RunningDaemon) -> None:
    noisy = issue(daemon, "noisy", "--rpm", "3")
    calm = issue(daemon, "calm")
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            call(daemon, noisy)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        results = [call(daemon, calm)[0] for _ in range(10)]
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert results == ["OK"] * 10
