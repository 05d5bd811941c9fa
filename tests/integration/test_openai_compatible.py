"""OpenAI-compatible endpoints end to end: a real daemon, the real llm OpenAI plugin and
`openai` client, and a fake endpoint on 127.0.0.1 (bench/fake_openai.py).

The daemon is configured as an operator would: `models.openai_compatible` names the
endpoint and a key name, and the key sits in `<state_dir>/keys/<name>`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog.testing

from bench.fake_openai import Behaviour, FakeOpenAI, Fault
from tests.conftest import RunningDaemon, make_config
from vibectl._proto import llm_proxy_pb2 as pb

KEY = "sk-gpubox-4f1c9a7e2b8d6035"
MODEL_ID = "local-qwen"
MODEL_NAME = "qwen2.5-32b"
REPO = Path(__file__).resolve().parents[2]


def auth(secret: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {secret}")]


def request(
    *user: str, system: tuple[str, ...] = (), model: str | None = MODEL_ID
) -> pb.ExecuteRequest:
    req = pb.ExecuteRequest(
        user_fragments=list(user), system_fragments=list(system), request_id="oc-1"
    )
    if model is not None:
        req.model_name = model
    return req


def endpoint(fake: FakeOpenAI, **changes: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "model_id": MODEL_ID,
        "model_name": MODEL_NAME,
        "api_base": fake.api_base,
        "api_key_name": "gpu-box",
    }
    entry.update(changes)
    return {key: value for key, value in entry.items() if value is not None}


def put_key(base: Path, name: str = "gpu-box", value: str = KEY) -> None:
    """Write a provider key file `<base>/keys/<name>` (base: a state or config dir)."""
    keys = base / "keys"
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = keys / name
    path.write_text(value + "\n", encoding="utf-8")
    path.chmod(0o600)


class Proxy:
    """A daemon serving `local-qwen` from the fake, and a client secret for it."""

    def __init__(self, daemon: RunningDaemon, fake: FakeOpenAI) -> None:
        self.daemon = daemon
        self.fake = fake
        self.secret = daemon.issue("alice")
        self.stub = daemon.stub()

    def execute(self, req: pb.ExecuteRequest, timeout: float = 30) -> pb.ExecuteResponse:
        reply: pb.ExecuteResponse = self.stub.Execute(
            req, metadata=auth(self.secret), timeout=timeout
        )
        return reply

    def stream(self, req: pb.ExecuteRequest, timeout: float = 30) -> list[pb.StreamChunk]:
        return list(self.stub.StreamExecute(req, metadata=auth(self.secret), timeout=timeout))

    def info(self) -> pb.GetServerInfoResponse:
        info: pb.GetServerInfoResponse = self.stub.GetServerInfo(
            pb.GetServerInfoRequest(), metadata=auth(self.secret), timeout=10
        )
        return info

    def assert_still_serving(self) -> None:
        self.fake.behaviour = Behaviour(reply="back to normal")
        assert self.execute(request("again")).success.response_text == "back to normal"
        chunks = self.stream(request("again"))
        assert "".join(c.text_chunk for c in chunks) == "back to normal"
        assert self.daemon.runtime.inflight.total() == 0


StartProxy = Callable[..., Proxy]


def stop_daemon(daemon: RunningDaemon) -> None:
    if daemon.thread.is_alive():
        daemon.stop()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI(Behaviour(latency_ms=20)) as server:
        yield server


@pytest.fixture
def start_proxy(
    start_daemon: Callable[..., RunningDaemon], fake: FakeOpenAI, tmp_path: Path
) -> StartProxy:
    def start(*, key: bool = True, limits: dict[str, Any] | None = None, **changes: Any) -> Proxy:
        state_dir = tmp_path / "state"
        if key:
            put_key(state_dir)
        overrides: dict[str, Any] = {"models": {"openai_compatible": [endpoint(fake, **changes)]}}
        if limits:
            overrides["limits"] = limits
        return Proxy(start_daemon(state_dir=state_dir, **overrides), fake)

    return start


@pytest.fixture
def proxy(start_proxy: StartProxy) -> Proxy:
    return start_proxy()


def assert_no_key(error: pb.ExecuteError, key: str = KEY) -> None:
    for text in (error.error_message, error.error_details):
        assert key not in text
        assert key[4:20] not in text


# -- the happy path ----------------------------------------------------------


def test_execute_reaches_the_endpoint_with_its_model_name_key_and_messages(
    proxy: Proxy,
) -> None:
    reply = proxy.execute(
        request(
            "why is my pod pending?",
            "kubectl describe says: 0/3 nodes",
            system=("You are a Kubernetes expert.", "Be brief."),
        )
    )
    assert reply.WhichOneof("result") == "success", reply
    assert reply.success.response_text == "Hello from the fake endpoint."
    assert reply.success.actual_model_used == MODEL_ID

    [sent] = proxy.fake.chat_requests()
    assert sent.body["model"] == MODEL_NAME
    assert sent.authorization == f"Bearer {KEY}"
    # System fragments are the system message, user fragments the user message.
    assert sent.messages == [
        {"role": "system", "content": "You are a Kubernetes expert.\n\nBe brief."},
        {"role": "user", "content": "why is my pod pending?\nkubectl describe says: 0/3 nodes"},
    ]
    # Execute asks the provider for the whole reply at once; usage comes with it.
    assert not sent.body.get("stream")

    metrics = reply.success.metrics
    assert metrics.input_tokens == 17  # words in both messages, as the fake counts them
    assert metrics.output_tokens == 5
    assert metrics.total_tokens == 22
    assert metrics.duration_ms >= 20  # the fake's latency
    assert metrics.timestamp > 0


def test_stream_execute_relays_the_endpoints_chunks_then_complete_then_usage(
    proxy: Proxy,
) -> None:
    proxy.fake.behaviour = Behaviour(
        stream_chunks=("Check ", "the ", "node ", "taints."), chunk_delay_ms=5
    )
    chunks = proxy.stream(request("why pending?", system=("be brief",)))
    kinds = [c.WhichOneof("chunk_type") for c in chunks]
    # Usually one message per chunk; chunks that were already waiting together (a busy
    # machine) come as one message.
    texts = kinds.count("text_chunk")
    assert 1 <= texts <= 4
    assert kinds == ["text_chunk"] * texts + ["complete", "final_metrics"]
    assert "".join(c.text_chunk for c in chunks[:texts]) == "Check the node taints."
    assert all(c.request_id == "oc-1" for c in chunks)
    assert chunks[-2].complete.actual_model_used == MODEL_ID
    metrics = chunks[-1].final_metrics
    assert (metrics.input_tokens, metrics.output_tokens, metrics.total_tokens) == (4, 5, 9)

    [sent] = proxy.fake.chat_requests()
    assert sent.body["model"] == MODEL_NAME
    assert sent.authorization == f"Bearer {KEY}"
    assert [m["role"] for m in sent.messages] == ["system", "user"]
    assert sent.messages[1]["content"] == "why pending?"


def test_chunks_already_waiting_are_relayed_as_fewer_larger_messages_with_the_same_text(
    proxy: Proxy,
) -> None:
    words = tuple(f"w{i} " for i in range(300))
    # No delay between chunks: the endpoint writes them faster than gRPC messages go out.
    proxy.fake.behaviour = Behaviour(stream_chunks=words)
    chunks = proxy.stream(request("everything"))
    kinds = [c.WhichOneof("chunk_type") for c in chunks]
    texts = [c.text_chunk for c in chunks if c.WhichOneof("chunk_type") == "text_chunk"]
    assert kinds == ["text_chunk"] * len(texts) + ["complete", "final_metrics"]
    assert "".join(texts) == "".join(words)
    assert all(texts)
    assert len(texts) < len(words) // 2, f"{len(texts)} messages for {len(words)} chunks"


def test_the_first_chunk_is_relayed_at_once_not_held_for_the_next(proxy: Proxy) -> None:
    proxy.fake.behaviour = Behaviour(
        stream_chunks=("first ", "second ", "third"), chunk_delay_ms=400
    )
    started = time.monotonic()
    arrived: list[tuple[float, str]] = []
    for c in proxy.stub.StreamExecute(request("hi"), metadata=auth(proxy.secret), timeout=30):
        if c.WhichOneof("chunk_type") == "text_chunk":
            arrived.append((time.monotonic() - started, c.text_chunk))
    assert [text for _, text in arrived] == ["first ", "second ", "third"]
    # The first went out as soon as it arrived, long before the second existed.
    assert arrived[1][0] - arrived[0][0] >= 0.3, arrived
    assert arrived[0][0] < arrived[1][0] - 0.3


def test_a_response_schema_is_sent_as_a_json_schema_response_format(proxy: Proxy) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}}
    proxy.fake.behaviour = Behaviour(reply='{"answer": "taints"}')
    req = request("why pending?")
    req.response_model_schema = json.dumps(schema)
    reply = proxy.execute(req)
    assert json.loads(reply.success.response_text) == {"answer": "taints"}
    [sent] = proxy.fake.chat_requests()
    assert sent.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


def test_server_info_lists_the_endpoint_model(proxy: Proxy) -> None:
    info = proxy.info()
    models = {m.model_id: m for m in info.available_models}
    assert MODEL_ID in models
    assert models[MODEL_ID].provider == "gpu-box"
    assert models[MODEL_ID].supports_streaming
    # Listing models does not call the endpoint.
    assert proxy.fake.request_count == 0


def test_an_alias_reaches_the_endpoint(
    start_daemon: Callable[..., RunningDaemon], fake: FakeOpenAI, tmp_path: Path
) -> None:
    put_key(tmp_path / "state")
    daemon = start_daemon(
        state_dir=tmp_path / "state",
        models={"openai_compatible": [endpoint(fake)], "aliases": {"qwen": MODEL_ID}},
    )
    p = Proxy(daemon, fake)
    reply = p.execute(request("hi", model="qwen"))
    assert reply.success.actual_model_used == MODEL_ID
    assert fake.chat_requests()[0].body["model"] == MODEL_NAME


# -- faults map to in-band errors ---------------------------------------------

FAULTS = [
    pytest.param(Fault.HTTP_500, "PROVIDER_ERROR", id="500"),
    pytest.param(Fault.HTTP_429, "PROVIDER_RATE_LIMITED", id="429"),
    pytest.param(Fault.HTTP_401, "PROVIDER_AUTH_ERROR", id="401"),
    pytest.param(Fault.MALFORMED, "PROVIDER_ERROR", id="malformed"),
    pytest.param(Fault.CUT, "PROVIDER_ERROR", id="cut"),
]


@pytest.mark.parametrize(("fault", "code"), FAULTS)
def test_endpoint_faults_are_in_band_errors_without_the_key(
    proxy: Proxy, fault: Fault, code: str
) -> None:
    # A short retry-after keeps the openai client's own 429 retries quick.
    proxy.fake.behaviour = Behaviour(fault=fault, retry_after="0.05", reply="one two three four")

    reply = proxy.execute(request("hi"))
    assert reply.WhichOneof("result") == "error", reply
    assert reply.request_id == "oc-1"
    assert reply.error.error_code == code
    assert MODEL_ID in reply.error.error_message
    assert_no_key(reply.error)

    chunks = proxy.stream(request("hi"))
    last = chunks[-1]
    assert last.WhichOneof("chunk_type") == "error"
    assert last.error.error_code == code
    assert_no_key(last.error)
    # Whatever came before the error is text the endpoint really sent.
    text = "".join(c.text_chunk for c in chunks[:-1])
    assert "one two three four".startswith(text)

    proxy.assert_still_serving()


def test_the_endpoints_error_text_goes_to_the_log_redacted_not_to_the_client(
    proxy: Proxy,
) -> None:
    """The 401 body quotes the key: the log keeps the rest of it; the client gets the code."""
    with structlog.testing.capture_logs() as records:
        proxy.fake.behaviour = Behaviour(fault=Fault.HTTP_401)
        error = proxy.execute(request("hi")).error
        assert error.error_code == "PROVIDER_AUTH_ERROR"
        assert error.error_details == "ProviderHTTPError (HTTP 401)"
        assert_no_key(error)
        # The endpoint really was sent the key it echoed.
        assert proxy.fake.chat_requests()[0].authorization == f"Bearer {KEY}"
        proxy.fake.behaviour = Behaviour(fault=Fault.HTTP_500)
        error = proxy.execute(request("hi")).error
        assert "crashed" not in error.error_message + error.error_details
        assert "request_id" in error.error_message
        assert_no_key(error)
        deadline = time.monotonic() + 5
        while len([r for r in records if r.get("provider_error")]) < 2:
            assert time.monotonic() < deadline, records
            time.sleep(0.01)
    logged = [r["provider_error"] for r in records if r.get("provider_error")]
    assert "Incorrect API key provided: ***" in logged[0]
    assert "the model crashed: ***" in logged[1]
    assert all(KEY not in text and KEY[4:20] not in text for text in logged)


def test_a_hanging_endpoint_times_out_at_the_request_timeout(start_proxy: StartProxy) -> None:
    proxy = start_proxy(limits={"request_timeout_seconds": 1})
    proxy.fake.behaviour = Behaviour(fault=Fault.HANG, hang_seconds=30)
    started = time.monotonic()
    reply = proxy.execute(request("hi"))
    elapsed = time.monotonic() - started
    assert reply.error.error_code == "PROVIDER_TIMEOUT"
    assert "1 s" in reply.error.error_message
    assert 0.9 <= elapsed < 5
    started = time.monotonic()
    chunks = proxy.stream(request("hi"))
    assert chunks[-1].error.error_code == "PROVIDER_TIMEOUT"
    assert time.monotonic() - started < 5
    # One attempt each: the daemon's timeout cancels the call, the client never retries.
    assert len(proxy.fake.chat_requests()) == 2
    proxy.assert_still_serving()


def test_a_stream_cut_mid_way_relays_the_text_then_an_error(proxy: Proxy) -> None:
    proxy.fake.behaviour = Behaviour(
        fault=Fault.CUT, cut_after=3, stream_chunks=("a ", "b ", "c ", "d ", "e ")
    )
    chunks = proxy.stream(request("hi"))
    kinds = [c.WhichOneof("chunk_type") for c in chunks]
    # Text that arrives in the same read as the cut may be dropped with it (aiohttp
    # discards what it buffered once the connection fails); never more than was sent.
    relayed = kinds.count("text_chunk")
    assert relayed <= 3
    assert kinds == ["text_chunk"] * relayed + ["error"]
    assert "a b c ".startswith("".join(c.text_chunk for c in chunks[:-1]))
    assert chunks[-1].error.error_code == "PROVIDER_ERROR"
    # A cut stream is never reported as complete.
    assert "complete" not in kinds and "final_metrics" not in kinds
    proxy.assert_still_serving()


def test_an_unreachable_endpoint_is_a_provider_error(
    start_daemon: Callable[..., RunningDaemon], tmp_path: Path
) -> None:
    with FakeOpenAI() as gone:
        entry = endpoint(gone)
    # Nothing listens there any more.
    put_key(tmp_path / "state")
    daemon = start_daemon(state_dir=tmp_path / "state", models={"openai_compatible": [entry]})
    stub = daemon.stub()
    secret = daemon.issue("alice")
    started = time.monotonic()
    reply = stub.Execute(request("hi"), metadata=auth(secret), timeout=30)
    elapsed = time.monotonic() - started
    assert reply.error.error_code == "PROVIDER_ERROR"
    assert_no_key(reply.error)
    print(f"\nconnection refused came back after {elapsed:.2f} s")


# -- provider refusals come back at once, as themselves ---------------------------


def test_a_500_is_not_retried_inside_the_daemon(proxy: Proxy) -> None:
    proxy.fake.behaviour = Behaviour(fault=Fault.HTTP_500, fault_times=1)
    reply = proxy.execute(request("hi"))
    assert reply.error.error_code == "PROVIDER_ERROR"
    assert len(proxy.fake.chat_requests()) == 1
    assert proxy.execute(request("hi")).success.response_text


def test_a_long_retry_after_is_reported_as_rate_limited(start_proxy: StartProxy) -> None:
    proxy = start_proxy(limits={"request_timeout_seconds": 3})
    proxy.fake.behaviour = Behaviour(fault=Fault.HTTP_429, retry_after="30")
    reply = proxy.execute(request("hi"))
    assert reply.error.error_code == "PROVIDER_RATE_LIMITED"
    assert len(proxy.fake.chat_requests()) == 1


# -- connections ------------------------------------------------------------------


def test_connections_to_the_endpoint_are_reused(proxy: Proxy) -> None:
    for _ in range(3):
        assert proxy.execute(request("hi")).success.response_text
    ports = {r.client_port for r in proxy.fake.chat_requests()}
    assert len(ports) == 1, f"{len(ports)} connections for 3 sequential requests"


def test_llms_stock_openai_models_reuse_connections_too(
    start_daemon: Callable[..., RunningDaemon],
    fake: FakeOpenAI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """llm's own gpt-4o-mini, pointed at the fake with the openai package's OPENAI_BASE_URL."""
    monkeypatch.setenv("OPENAI_BASE_URL", fake.api_base)
    put_key(tmp_path / "state", name="openai", value="sk-stock-openai-key-0042")
    daemon = start_daemon(state_dir=tmp_path / "state", models={"allowed": ["gpt-4o-mini"]})
    secret = daemon.issue("alice")
    stub = daemon.stub()
    for _ in range(3):
        reply = stub.Execute(request("hi", model="gpt-4o-mini"), metadata=auth(secret), timeout=30)
        assert reply.success.response_text == "Hello from the fake endpoint."
    sent = fake.chat_requests()
    assert len(sent) == 3 and {r.authorization for r in sent} == {"Bearer sk-stock-openai-key-0042"}
    assert len({r.client_port for r in sent}) == 1, "one connection for 3 sequential requests"


# -- keys ------------------------------------------------------------------------


def test_without_the_key_file_the_model_is_not_offered(start_proxy: StartProxy) -> None:
    proxy = start_proxy(key=False)
    assert MODEL_ID not in {m.model_id for m in proxy.info().available_models}
    reply = proxy.execute(request("hi"))
    assert reply.error.error_code == "MODEL_NOT_FOUND"
    assert MODEL_ID in reply.error.error_message
    assert proxy.fake.request_count == 0


def test_an_endpoint_without_a_key_name_is_sent_no_real_key(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-should-never-leave-1234")
    proxy = start_proxy(api_key_name=None)  # the gpu-box key file exists, but is not named
    info = proxy.info()
    assert MODEL_ID in {m.model_id for m in info.available_models}
    reply = proxy.execute(request("hi"))
    assert reply.success.response_text == "Hello from the fake endpoint."
    [sent] = proxy.fake.chat_requests()
    assert sent.body["model"] == MODEL_NAME
    # No key configured, so no Authorization header at all (llm's openai client sent a placeholder).
    assert sent.authorization is None
    for value in sent.headers.values():
        assert KEY not in value and "sk-openai" not in value


def test_the_openai_key_is_never_sent_to_an_openai_compatible_endpoint(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    openai_key = "sk-openai-operators-real-key-9876"
    monkeypatch.setenv("OPENAI_API_KEY", openai_key)
    proxy = start_proxy(key=False)
    reply = proxy.execute(request("hi"))
    for sent in proxy.fake.requests:
        assert openai_key not in (sent.authorization or "")
    assert reply.error.error_code == "MODEL_NOT_FOUND"


def test_a_key_in_the_config_dirs_keys_wins_over_the_state_dirs(
    fake: FakeOpenAI, tmp_path: Path, sock_dir: Path
) -> None:
    """`<config dir>/keys/` comes before `<state dir>/keys/` (as if loaded from a file)."""
    put_key(tmp_path / "etc", value="sk-from-the-config-dir-0001")
    put_key(tmp_path / "state", value="sk-from-the-state-dir-0002")
    config = make_config(
        tmp_path / "state", sock_dir, models={"openai_compatible": [endpoint(fake)]}
    )
    running = RunningDaemon(replace(config, config_path=tmp_path / "etc" / "config.yaml"))
    try:
        running.start()
        reply = Proxy(running, fake).execute(request("hi"))
        assert reply.success.response_text
        [sent] = fake.chat_requests()
        assert sent.authorization == "Bearer sk-from-the-config-dir-0001"
    finally:
        stop_daemon(running)


# -- the fake itself -------------------------------------------------------------


def test_the_fake_speaks_the_openai_wire_format_without_streaming(fake: FakeOpenAI) -> None:
    """The daemon always streams; the non-streaming path is checked with the client itself."""
    with openai.OpenAI(base_url=fake.api_base, api_key="k-direct", max_retries=0) as client:
        completion = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "two words"}]
        )
        assert completion.choices[0].message.content == "Hello from the fake endpoint."
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 5)
        fake.behaviour = Behaviour(fault=Fault.MALFORMED)
        with pytest.raises(ValueError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
        fake.behaviour = Behaviour(fault=Fault.CUT)
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert [r.authorization for r in fake.chat_requests()] == ["Bearer k-direct"] * 3


def test_the_fake_runs_standalone_and_prints_its_port() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with subprocess.Popen(
        [sys.executable, "-m", "bench.fake_openai", "--port", "0", "--latency-ms", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    ) as proc:
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline())
            base = f"http://127.0.0.1:{port}/v1"
            with openai.OpenAI(base_url=base, api_key="k", max_retries=0) as client:
                stream = client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    stream_options={"include_usage": True},
                )
                text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            assert text == "Hello from the fake endpoint."
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "served 1 requests" in err
