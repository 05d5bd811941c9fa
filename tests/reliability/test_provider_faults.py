"""Provider faults through a real daemon: every fault is an in-band error, nothing leaks.

A fake OpenAI-compatible endpoint (bench/fake_openai.py) is registered as an
operator would (`models.openai_compatible`, key in `<state>/keys/`), with a
request timeout of 1 s. For each fault — HTTP 500, 429 with a long
`retry-after`, a malformed body, a stream cut mid-way, a hang past the timeout —
a batch of concurrent Execute and StreamExecute calls must come back with the
documented `ExecuteError.error_code`, the daemon must stay healthy (gRPC health
SERVING, a normal call succeeds), and threads, asyncio tasks on the daemon's
loop and connections to the provider must not grow with the number of calls.
"""

from __future__ import annotations

import asyncio
import grp
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.fake_openai import Behaviour, End, FakeOpenAI, Fault
from tests.conftest import RunningDaemon, _register_fake_models, short_tmpdir
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc
from vibectld.config_file import parse_config

MODEL_ID = "remote"
KEY = "sk-reliability-0123456789abcdef"
# Concurrent calls of each kind in a batch: Execute and StreamExecute each.
BATCH = 50
CALL_TIMEOUT = 20.0
# How long threads, tasks and connections get to return to their baseline.
SETTLE_SECONDS = 10.0
SERVICE = "vibectl.llm_proxy.VibectlLLMProxy"

# Threads the fake's HTTP server starts, one per connection the daemon holds open.
FAKE_HANDLER_SUFFIX = "(process_request_thread)"
# The workers of the daemon loop's default executor (getaddrinfo, to_thread): a pool
# that grows on demand up to its fixed size and never shrinks.
EXECUTOR_PREFIX = "asyncio_"
EXECUTOR_MAX = min(32, (os.cpu_count() or 1) + 4)


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def request(prompt: str = "hi") -> pb.ExecuteRequest:
    return pb.ExecuteRequest(user_fragments=[prompt], model_name=MODEL_ID, request_id="pf")


class Proxy:
    def __init__(self, daemon: RunningDaemon, fake: FakeOpenAI) -> None:
        self.daemon = daemon
        self.fake = fake
        self.secret = daemon.issue("faulty-provider-client")
        self.channel = daemon.channel()
        self.stub = pb_grpc.VibectlLLMProxyStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def batch(self, n: int) -> tuple[list[pb.ExecuteResponse], list[list[pb.StreamChunk]]]:
        """`n` Execute and `n` StreamExecute calls, all in flight at once."""
        meta = auth(self.secret)
        futures = [
            self.stub.Execute.future(request(), metadata=meta, timeout=CALL_TIMEOUT)
            for _ in range(n)
        ]
        streams = [
            self.stub.StreamExecute(request(), metadata=meta, timeout=CALL_TIMEOUT)
            for _ in range(n)
        ]
        replies = [f.result(timeout=CALL_TIMEOUT + 5) for f in futures]
        chunks = [list(s) for s in streams]
        return replies, chunks

    def assert_healthy(self) -> None:
        for service in ("", SERVICE):
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        self.fake.behaviour = Behaviour(reply="all good again")
        meta = auth(self.secret)
        reply = self.stub.Execute(request(), metadata=meta, timeout=CALL_TIMEOUT)
        assert reply.success.response_text == "all good again", reply
        chunks = list(self.stub.StreamExecute(request(), metadata=meta, timeout=CALL_TIMEOUT))
        assert "".join(c.text_chunk for c in chunks) == "all good again"
        assert chunks[-1].WhichOneof("chunk_type") == "final_metrics"


@dataclass(frozen=True)
class Snapshot:
    # Every thread of this process but the two on-demand pools counted below.
    threads: tuple[str, ...]
    executor_threads: int
    fake_handlers: int
    tasks: int
    fake_connections: int
    inflight: int

    def summary(self) -> str:
        return (
            f"threads={len(self.threads)} (+{self.executor_threads} loop executor) "
            f"tasks={self.tasks} provider-connections={self.fake_connections} "
            f"(fake handler threads {self.fake_handlers}) in-flight={self.inflight}"
        )


async def _count_tasks() -> int:
    return len(asyncio.all_tasks())


def snapshot(proxy: Proxy) -> Snapshot:
    names = [t.name for t in threading.enumerate()]
    pooled = [n for n in names if n.endswith(FAKE_HANDLER_SUFFIX) or n.startswith(EXECUTOR_PREFIX)]
    return Snapshot(
        threads=tuple(sorted(set(names) - set(pooled))),
        executor_threads=sum(n.startswith(EXECUTOR_PREFIX) for n in names),
        fake_handlers=sum(n.endswith(FAKE_HANDLER_SUFFIX) for n in names),
        tasks=int(proxy.daemon.run(_count_tasks(), timeout=10)),
        fake_connections=proxy.fake.open_connections,
        inflight=proxy.daemon.runtime.inflight.total(),
    )


def settled(proxy: Proxy, baseline: Snapshot) -> Snapshot:
    """The first snapshot no bigger than `baseline`, or the last one after SETTLE_SECONDS."""
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        now = snapshot(proxy)
        if (
            len(now.threads) <= len(baseline.threads)
            and now.tasks <= baseline.tasks
            and now.inflight == 0
            and now.fake_connections <= BATCH
        ) or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def put_key(state_dir: Path) -> None:
    keys = state_dir / "keys"
    keys.mkdir(mode=0o700, parents=True)
    (keys / "remote-box").write_text(KEY + "\n", encoding="utf-8")
    (keys / "remote-box").chmod(0o600)


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def proxy(fake: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    _register_fake_models()
    state_dir = tmp_path_factory.mktemp("provider-faults") / "state"
    put_key(state_dir)
    sock_dir = short_tmpdir()
    config = parse_config(
        {
            "server": {"listen": "127.0.0.1:0", "name": "provider-faults"},
            "admin": {
                "socket": str(sock_dir / "admin.sock"),
                "group": grp.getgrgid(os.getgid()).gr_name,
            },
            "state_dir": str(state_dir),
            "models": {
                "default": MODEL_ID,
                "openai_compatible": [
                    {
                        "model_id": MODEL_ID,
                        "model_name": "remote-7b",
                        "api_base": fake.api_base,
                        "api_key_name": "remote-box",
                    }
                ],
            },
            "limits": {
                "requests_per_minute": None,
                "concurrent_requests": None,
                "request_timeout_seconds": 1,
            },
            "logging": {"level": "error", "format": "console"},
        }
    )
    daemon = RunningDaemon(config).start()
    try:
        yield Proxy(daemon, fake)
    finally:
        daemon.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def baseline(proxy: Proxy) -> Snapshot:
    """Threads, tasks and connections after a warm-up batch of good calls at full concurrency.

    The warm-up lets every pool that grows on demand (the provider connection
    pool, the loop's default executor, gRPC's own threads) reach its size.
    """
    proxy.fake.behaviour = Behaviour(reply="warm", latency_ms=20)
    replies, streams = proxy.batch(BATCH)
    assert all(r.success.response_text == "warm" for r in replies)
    assert all(s[-1].WhichOneof("chunk_type") == "final_metrics" for s in streams)
    time.sleep(0.5)
    first = snapshot(proxy)
    print(f"\nbaseline after {2 * BATCH} good calls: {first.summary()}")
    return first


FAULTS = [
    pytest.param(Behaviour(fault=Fault.HTTP_500), "PROVIDER_ERROR", id="http-500"),
    # A long retry-after: the daemon must answer at once, not sleep through it.
    pytest.param(
        Behaviour(fault=Fault.HTTP_429, retry_after="30"), "PROVIDER_RATE_LIMITED", id="http-429"
    ),
    pytest.param(Behaviour(fault=Fault.MALFORMED), "PROVIDER_ERROR", id="malformed-json"),
    pytest.param(
        Behaviour(fault=Fault.CUT, reply="one two three four five six", cut_after=3),
        "PROVIDER_ERROR",
        id="stream-cut",
    ),
    # Hangs past request_timeout_seconds=1.
    pytest.param(Behaviour(fault=Fault.HANG, hang_seconds=8), "PROVIDER_TIMEOUT", id="hang"),
]


@pytest.mark.parametrize(("behaviour", "code"), FAULTS)
@pytest.mark.timeout(120)
def test_a_batch_of_provider_faults_is_in_band_errors_and_leaks_nothing(
    proxy: Proxy, baseline: Snapshot, behaviour: Behaviour, code: str
) -> None:
    proxy.fake.clear()
    proxy.fake.behaviour = behaviour
    started = time.monotonic()
    replies, streams = proxy.batch(BATCH)
    elapsed = time.monotonic() - started

    for reply in replies:
        assert reply.WhichOneof("result") == "error", reply
        assert reply.error.error_code == code, reply
        assert MODEL_ID in reply.error.error_message
        assert KEY not in reply.error.error_message + reply.error.error_details
    for chunks in streams:
        kinds = [c.WhichOneof("chunk_type") for c in chunks]
        # Text the provider really sent may come first; the stream ends with the error,
        # never with complete/final_metrics.
        assert kinds[-1] == "error", kinds
        assert set(kinds[:-1]) <= {"text_chunk"}, kinds
        assert chunks[-1].error.error_code == code
        text = "".join(c.text_chunk for c in chunks[:-1])
        # For a cut, text in the same read as the cut may be dropped with it.
        assert behaviour.reply.startswith(text)
        if behaviour.fault is Fault.CUT:
            assert "one two three".startswith(text)
    # Every call reached the provider once: no retries inside the daemon. (A call
    # that hangs may time out before it reaches the provider on a loaded machine.)
    reached = proxy.fake.request_count
    if behaviour.fault is Fault.HANG:
        assert BATCH <= reached <= 2 * BATCH
    else:
        assert reached == 2 * BATCH

    if behaviour.fault is Fault.HANG:
        # The daemon gave up at its 1 s timeout and closed the provider connection
        # (the fake saw it); it did not leave the hung request to run for 8 s.
        ends = proxy.fake.wait_for_ends(reached, timeout=10)
        assert len(ends) == reached
        assert {e.end for e in ends} == {End.CLIENT_CLOSED}
        held = sorted(e.ended_at - e.started_at for e in ends)
        print(f"\nhung provider calls closed by the daemon after {held[0]:.2f}-{held[-1]:.2f} s")
        assert held[-1] < 5
    if behaviour.fault is Fault.HTTP_429:
        assert elapsed < 15, "the daemon slept through retry-after"

    after = settled(proxy, baseline)
    print(
        f"\nfault {behaviour.fault.value if behaviour.fault else 'none'}: {2 * BATCH} calls "
        f"in {elapsed:.2f} s; after: {after.summary()}"
    )
    grown = sorted(set(after.threads) - set(baseline.threads))
    assert len(after.threads) <= len(baseline.threads), f"threads grew: {grown}"
    assert after.executor_threads <= EXECUTOR_MAX
    assert after.tasks <= baseline.tasks, f"tasks grew: {baseline.tasks} -> {after.tasks}"
    assert after.inflight == 0
    # Connections to the provider are pooled: never more than the calls ever in flight.
    assert after.fake_connections <= 2 * BATCH
    assert after.fake_handlers <= 2 * BATCH
    proxy.assert_healthy()


@pytest.mark.timeout(120)
def test_mixed_faults_repeated_leave_threads_tasks_and_connections_flat(
    proxy: Proxy, baseline: Snapshot
) -> None:
    """Three rounds of every fault at once: the counts after each round do not grow."""
    kinds: list[Any] = [p.values[0] for p in FAULTS]
    rounds: list[Snapshot] = []
    for _ in range(3):
        for behaviour in kinds:
            proxy.fake.behaviour = behaviour
            replies, streams = proxy.batch(BATCH // 5)
            assert all(r.WhichOneof("result") == "error" for r in replies)
            assert all(s[-1].WhichOneof("chunk_type") == "error" for s in streams)
        rounds.append(settled(proxy, baseline))
    for i, snap in enumerate(rounds, 1):
        print(f"\nround {i}: {snap.summary()}")
    assert max(len(r.threads) for r in rounds) <= len(baseline.threads)
    assert max(r.executor_threads for r in rounds) <= EXECUTOR_MAX
    assert max(r.tasks for r in rounds) <= baseline.tasks
    # Pooled connections: never more than the calls of one batch in flight at once.
    assert max(r.fake_connections for r in rounds) <= 2 * (BATCH // 5)
    proxy.assert_healthy()


@pytest.mark.parametrize(
    ("behaviour", "reusable"),
    [
        pytest.param(Behaviour(fault=Fault.HTTP_500), True, id="http-500"),
        pytest.param(Behaviour(fault=Fault.HTTP_429, retry_after="30"), True, id="http-429"),
        pytest.param(Behaviour(fault=Fault.MALFORMED), True, id="malformed-json"),
        pytest.param(Behaviour(fault=Fault.CUT), False, id="stream-cut"),
    ],
)
def test_provider_connections_survive_error_answers(
    proxy: Proxy, behaviour: Behaviour, reusable: bool
) -> None:
    """Sequential faulty calls: a complete error answer leaves the connection reusable."""
    proxy.fake.clear()
    proxy.fake.behaviour = behaviour
    calls = 20
    for _ in range(calls):
        reply = proxy.stub.Execute(request(), metadata=auth(proxy.secret), timeout=CALL_TIMEOUT)
        assert reply.WhichOneof("result") == "error"
    ports = {r.client_port for r in proxy.fake.chat_requests()}
    print(
        f"\n{calls} sequential Execute calls answered {behaviour.fault}: {len(ports)} connection(s)"
    )
    if reusable:
        assert len(ports) <= 2, f"{len(ports)} connections for {calls} sequential calls"
    else:
        # A cut connection cannot be reused: a new one per call, none kept.
        assert len(ports) == calls
    proxy.assert_healthy()
