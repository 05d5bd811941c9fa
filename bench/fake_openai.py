"""A local fake of an OpenAI-compatible endpoint, for tests and the benchmark.

It speaks just enough of ``POST /v1/chat/completions`` for the ``openai``
Python client (which llm's OpenAI plugin uses) to parse its answers, both as
one JSON document and as a ``text/event-stream`` of ``chat.completion.chunk``
events (chunked transfer encoding, like vLLM or Ollama behind uvicorn), with a
final ``usage`` chunk when ``stream_options.include_usage`` asks for it.

Every request is recorded (method, path, headers, JSON body) for assertions,
and the behaviour is set per test: latency, reply text, and faults (HTTP 500,
429 with ``retry-after``, 401, a hang, a malformed body, a stream cut off
mid-way). Error bodies echo the presented API key by default, like a careless
upstream would, so tests can prove the daemon redacts it.

How every streamed response and every hang ended is recorded too
(`FakeOpenAI.response_ends`): while it waits between chunks or hangs, the fake
watches its connection, so a client that gives up (a cancelled call) shows as
``client_closed`` with the moment the fake saw the connection close.

In a test::

    with FakeOpenAI(Behaviour(latency_ms=20)) as fake:
        ...  # point api_base at fake.api_base
        fake.behaviour = Behaviour(fault=Fault.HTTP_500)
        assert fake.requests[-1].authorization == "Bearer ..."

Standalone (the benchmark's provider section): ``python -m bench.fake_openai --port 0
--latency-ms 20`` prints the port it listens on, then serves until SIGINT or SIGTERM.
Like a real endpoint it sets TCP_NODELAY on every connection: without it the response
head and body go out as two small segments and Nagle's algorithm holds the second until
the client's delayed ACK (about 40 ms on Linux), whatever the client.

It lives in bench/ rather than tests/ so that the benchmark need not import the tests;
the tests import it from here.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import itertools
import json
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType, TracebackType
from typing import Any, cast

CHAT_PATH = "/v1/chat/completions"
MODELS_PATH = "/v1/models"


class Fault(enum.Enum):
    """How a request goes wrong; None in `Behaviour.fault` means it does not."""

    HTTP_500 = "500"
    HTTP_429 = "429"
    HTTP_401 = "401"
    # Accept the request and never answer (until the server closes or `hang_seconds` pass).
    HANG = "hang"
    # 200 with a body that is not valid JSON (an invalid SSE data line when streaming).
    MALFORMED = "malformed"
    # Stream `cut_after` content chunks, then drop the connection mid-body
    # (not streaming: send half of the declared body, then drop).
    CUT = "cut"


@dataclass(frozen=True)
class Behaviour:
    """What the fake does with the next requests; replace `FakeOpenAI.behaviour` to change it."""

    reply: str = "Hello from the fake endpoint."
    # Delay before the response starts, and between streamed content chunks.
    latency_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    # How the reply is streamed; None splits it into words (keeping their spaces).
    stream_chunks: tuple[str, ...] | None = None
    fault: Fault | None = None
    # The fault hits only the first `fault_times` requests (None: all of them).
    fault_times: int | None = None
    # The `retry-after` header of a 429 (None: no header).
    retry_after: str | None = "1"
    hang_seconds: float = 60.0
    cut_after: int = 2
    # Error bodies quote the API key the request presented.
    echo_key: bool = True
    # Usage reported; None counts words (prompt: all message contents; completion: reply).
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

    def chunks(self) -> list[str]:
        if self.stream_chunks is not None:
            return list(self.stream_chunks)
        words = self.reply.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    # Header names lower-cased; a repeated header keeps its last value.
    headers: dict[str, str]
    raw_body: bytes
    # The parsed JSON body, or None when it was absent or not JSON.
    body: Any
    # The client's source port: requests on one kept-alive connection share it.
    client_port: int = 0
    received_at: float = field(default_factory=time.monotonic)

    @property
    def authorization(self) -> str | None:
        return self.headers.get("authorization")

    @property
    def messages(self) -> list[dict[str, Any]]:
        if isinstance(self.body, dict) and isinstance(self.body.get("messages"), list):
            return cast(list[dict[str, Any]], self.body["messages"])
        return []

    @property
    def streamed(self) -> bool:
        return isinstance(self.body, dict) and bool(self.body.get("stream"))


class End(enum.Enum):
    """How a streamed response (or a hang) ended at the fake."""

    # Every chunk and the end of the body were sent.
    COMPLETE = "complete"
    # The fake cut it on purpose (Fault.CUT).
    CUT = "cut"
    # The client closed the connection first (seen as EOF while waiting, or a failed write).
    CLIENT_CLOSED = "client_closed"
    # The fake itself was closing.
    SERVER_CLOSING = "server_closing"
    # A hang ran its whole `hang_seconds` without the client giving up.
    HANG_EXPIRED = "hang_expired"


@dataclass(frozen=True)
class ResponseEnd:
    """One streamed response, or one hang, and how it ended."""

    # "stream" or "hang".
    kind: str
    model: str
    client_port: int
    started_at: float
    ended_at: float
    # Content chunks written (a hang writes none).
    chunks_sent: int
    end: End


def _words(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(part.get("text")) for part in value if isinstance(part, dict))
    return 0


class _Server(ThreadingHTTPServer):
    # Handler threads are joined on close; close() first unblocks every one of them.
    daemon_threads = False
    block_on_close = True
    # socketserver's default backlog of 5 drops connections a burst of callers opens at
    # once (they retry after a 1 s SYN timeout); a real endpoint accepts them.
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], fake: FakeOpenAI) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that resets its connection (a cancelled call) is no error of the fake's.
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # TCP_NODELAY, as real servers (uvicorn, nginx) set it: without it the body, written
    # after the headers, waits for the client's delayed ACK — 40 ms on every response.
    disable_nagle_algorithm = True
    server_version = "fake-openai/1.0"
    sys_version = ""

    @property
    def fake(self) -> FakeOpenAI:
        return cast(_Server, self.server).fake

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.fake._lock:
                self.fake._connections.discard(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- requests ------------------------------------------------------------

    def _record(self) -> RecordedRequest:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        recorded = RecordedRequest(
            method=self.command,
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            raw_body=raw,
            body=body,
            client_port=int(self.client_address[1]),
        )
        self.fake._record(recorded)
        return recorded

    def do_GET(self) -> None:
        self._record()
        if self.path.rstrip("/") != MODELS_PATH:
            self._error(404, "not_found", f"no route for GET {self.path}", None)
            return
        created = int(time.time())
        models = [
            {"id": name, "object": "model", "created": created, "owned_by": "fake"}
            for name in self.fake.model_names
        ]
        self._json(200, {"object": "list", "data": models})

    def do_POST(self) -> None:
        req = self._record()
        if self.path.rstrip("/") != CHAT_PATH:
            self._error(404, "not_found", f"no route for POST {self.path}", None)
            return
        if not isinstance(req.body, dict) or not req.messages or not req.body.get("model"):
            self._error(400, "invalid_request_error", "body needs model and messages", None)
            return
        behaviour, fault = self.fake._next(req)
        key = _bearer(req.authorization) if behaviour.echo_key else None
        if self._wait(behaviour.latency_ms / 1000) is not None:
            self._drop()
            return
        if fault is Fault.HTTP_500:
            self._error(500, "server_error", "the model crashed", key)
        elif fault is Fault.HTTP_429:
            headers = {"retry-after": behaviour.retry_after} if behaviour.retry_after else {}
            self._error(429, "rate_limit_error", "rate limit reached", key, headers)
        elif fault is Fault.HTTP_401:
            message = "Incorrect API key provided"
            self._error(401, "invalid_request_error", message, key, code="invalid_api_key")
        elif fault is Fault.HANG:
            started = time.monotonic()
            why = self._wait(behaviour.hang_seconds)
            self._ended(req, "hang", started, 0, why or End.HANG_EXPIRED)
            self._drop()
        elif req.streamed:
            self._stream(req, behaviour, fault)
        elif fault is Fault.MALFORMED:
            self._send(200, "application/json", b'{"id": "chatcmpl-broken", "choices": [{')
        elif fault is Fault.CUT:
            body = json.dumps(self._completion(req, behaviour)).encode()
            self._send(200, "application/json", body, cut=len(body) // 2)
        else:
            self._json(200, self._completion(req, behaviour))

    # -- responses -----------------------------------------------------------

    def _usage(self, req: RecordedRequest, behaviour: Behaviour) -> dict[str, int]:
        prompt = behaviour.prompt_tokens
        if prompt is None:
            prompt = sum(_words(m.get("content")) for m in req.messages)
        completion = behaviour.completion_tokens
        if completion is None:
            completion = len(behaviour.reply.split())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    def _completion(self, req: RecordedRequest, behaviour: Behaviour) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-fake{self.fake._serial()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.body["model"],
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": behaviour.reply},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": self._usage(req, behaviour),
        }

    def _wait(self, seconds: float) -> End | None:
        """Sleep up to `seconds` watching the connection; None if nothing happened meanwhile.

        Returns SERVER_CLOSING when the fake is closing, CLIENT_CLOSED as soon as
        the client has closed (or reset) the connection.
        """
        deadline = time.monotonic() + seconds
        while True:
            if self.fake._stop.is_set():
                return End.SERVER_CLOSING
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                readable, _, _ = select.select([self.connection], [], [], min(remaining, 0.05))
                peeked = self.connection.recv(1, socket.MSG_PEEK) if readable else None
            except (OSError, ValueError):
                return End.CLIENT_CLOSED
            if peeked == b"":
                return End.CLIENT_CLOSED
            if peeked:
                # Bytes of a next request: nothing to watch for until they are read.
                return End.SERVER_CLOSING if self.fake._pause(remaining) else None

    def _ended(
        self, req: RecordedRequest, kind: str, started: float, chunks: int, end: End
    ) -> None:
        model = str(req.body.get("model")) if isinstance(req.body, dict) else ""
        self.fake._record_end(
            ResponseEnd(kind, model, req.client_port, started, time.monotonic(), chunks, end)
        )

    def _stream(self, req: RecordedRequest, behaviour: Behaviour, fault: Fault | None) -> None:
        started = time.monotonic()
        sent = 0
        base = {
            "id": f"chatcmpl-fake{self.fake._serial()}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": req.body["model"],
            "system_fingerprint": None,
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        end = End.COMPLETE
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if fault is Fault.MALFORMED:
                self._event(b'{"id": "chatcmpl-broken", "choices": [{"delta": ')
                self._event(b"[DONE]")
                self._end_body()
                return
            self._event(chunk({"role": "assistant", "content": ""}))
            for i, text in enumerate(behaviour.chunks()):
                if fault is Fault.CUT and i >= behaviour.cut_after:
                    end = End.CUT
                    self._drop()
                    return
                why = self._wait(behaviour.chunk_delay_ms / 1000) if i else None
                if why is not None:
                    end = why
                    self._drop()
                    return
                self._event(chunk({"content": text}))
                sent += 1
                self.fake._chunk_sent()
            if fault is Fault.CUT:
                end = End.CUT
                self._drop()
                return
            self._event(chunk({}, "stop"))
            options = req.body.get("stream_options") or {}
            if isinstance(options, dict) and options.get("include_usage"):
                self._event({**base, "choices": [], "usage": self._usage(req, behaviour)})
            self._event(b"[DONE]")
            self._end_body()
        except OSError:
            # The client went away (e.g. the daemon cancelled the call).
            end = End.CLIENT_CLOSED
            self.close_connection = True
        finally:
            self._ended(req, "stream", started, sent, end)

    def _event(self, data: dict[str, Any] | bytes) -> None:
        payload = data if isinstance(data, bytes) else json.dumps(data).encode()
        frame = b"data: " + payload + b"\n\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(frame), frame))
        self.wfile.flush()

    def _end_body(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        """Close the connection abruptly, mid-response if one was started."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(
        self,
        status: int,
        content_type: str,
        body: bytes,
        headers: dict[str, str] | None = None,
        cut: int | None = None,
    ) -> None:
        """Send a whole response; with `cut`, only that many body bytes, then drop."""
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body if cut is None else body[:cut])
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        if cut is not None:
            self._drop()

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(payload).encode(), headers)

    def _error(
        self,
        status: int,
        kind: str,
        message: str,
        key: str | None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
    ) -> None:
        if key:
            message = f"{message}: {key}"
        error = {"message": message, "type": kind, "param": None, "code": code}
        self._json(status, {"error": error}, headers)


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:]
    return None


class FakeOpenAI:
    """The fake server, listening on 127.0.0.1 in a background thread while started."""

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_names: Sequence[str] = ("fake-model",),
        record: bool = True,
    ) -> None:
        self.behaviour = behaviour or Behaviour()
        # Behaviour for requests naming a given model; others get `behaviour`.
        self.per_model: dict[str, Behaviour] = {}
        self.model_names = tuple(model_names)
        self._address = (host, port)
        self._lock = threading.Lock()
        # Long benchmark runs only count requests instead of keeping them.
        self._record_requests = record
        self._requests: list[RecordedRequest] = []
        self._ends: list[ResponseEnd] = []
        self._chunks = 0
        self._count = 0
        self._faults_served = 0
        self._serials = itertools.count(1)
        self._stop = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> FakeOpenAI:
        self._server = _Server(self._address, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-openai",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, cut open connections (releasing hung requests), join every thread."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stop.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        assert self._server is not None, "the fake is not started"
        return int(self._server.server_address[1])

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- control and inspection ----------------------------------------------

    def set(self, **changes: Any) -> Behaviour:
        """Change some fields of the default behaviour (and restart the fault count)."""
        with self._lock:
            self.behaviour = replace(self.behaviour, **changes)
            self._faults_served = 0
            return self.behaviour

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.rstrip("/") == CHAT_PATH]

    def clear(self) -> None:
        with self._lock:
            self._requests.clear()
            self._ends.clear()
            self._chunks = 0
            self._count = 0
            self._faults_served = 0

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        deadline = time.monotonic() + timeout
        while self.request_count < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.requests

    @property
    def response_ends(self) -> list[ResponseEnd]:
        """How each streamed response and hang ended, in the order they ended."""
        with self._lock:
            return list(self._ends)

    def wait_for_ends(self, count: int, timeout: float = 5.0) -> list[ResponseEnd]:
        """Wait until `count` responses have ended (or `timeout` passes); return them all."""
        deadline = time.monotonic() + timeout
        while len(self.response_ends) < count and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.response_ends

    @property
    def chunks_sent(self) -> int:
        """Content chunks written to streams so far (since the start or the last clear())."""
        with self._lock:
            return self._chunks

    @property
    def open_connections(self) -> int:
        """Client connections the fake holds open right now."""
        with self._lock:
            return len(self._connections)

    @property
    def request_count(self) -> int:
        """Requests received since the start or the last clear(), recorded or not."""
        with self._lock:
            return self._count

    def _record(self, req: RecordedRequest) -> None:
        with self._lock:
            self._count += 1
            if self._record_requests:
                self._requests.append(req)

    def _chunk_sent(self) -> None:
        with self._lock:
            self._chunks += 1

    def _record_end(self, end: ResponseEnd) -> None:
        if self._record_requests:
            with self._lock:
                self._ends.append(end)

    def _next(self, req: RecordedRequest) -> tuple[Behaviour, Fault | None]:
        with self._lock:
            model = req.body.get("model") if isinstance(req.body, dict) else None
            behaviour = self.per_model.get(str(model), self.behaviour)
            fault = behaviour.fault
            if fault is not None and behaviour.fault_times is not None:
                if self._faults_served >= behaviour.fault_times:
                    fault = None
                else:
                    self._faults_served += 1
            return behaviour, fault

    def _serial(self) -> int:
        return next(self._serials)

    def _pause(self, seconds: float) -> bool:
        """Sleep; True when the server is closing meanwhile."""
        if seconds <= 0:
            return self._stop.is_set()
        return self._stop.wait(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fake_openai",
        description="A fake OpenAI-compatible endpoint; prints its port, serves until killed.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--reply", default=Behaviour.reply)
    parser.add_argument("--fault", choices=[f.value for f in Fault], default=None)
    args = parser.parse_args(argv)
    behaviour = Behaviour(
        reply=args.reply,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        fault=Fault(args.fault) if args.fault else None,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with FakeOpenAI(behaviour, host=args.host, port=args.port, record=False) as fake:
        print(fake.port, flush=True)
        while not stop.wait(3600):
            pass
        served = fake.request_count
    print(f"served {served} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
