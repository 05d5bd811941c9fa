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
import itertools
import signal
import socket
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from types import FrameType
from typing import Any

from bench.fake_openai_http import _Server
from bench.fake_openai_spec import (  # re-exported: tests and the bench import them from here
    CHAT_PATH as CHAT_PATH,
)
from bench.fake_openai_spec import (
    MODELS_PATH as MODELS_PATH,
)
from bench.fake_openai_spec import (
    Behaviour as Behaviour,
)
from bench.fake_openai_spec import (
    End as End,
)
from bench.fake_openai_spec import (
    Fault as Fault,
)
from bench.fake_openai_spec import (
    RecordedRequest as RecordedRequest,
)
from bench.fake_openai_spec import (
    ResponseEnd as ResponseEnd,
)
from bench.lifetime import ClosedOnExit


class FakeOpenAI(ClosedOnExit):
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
    parser.add_argument(
        "--stream-chunk", default=None, help="stream this text as every chunk (not the reply)"
    )
    parser.add_argument("--stream-count", type=int, default=50, help="chunks of --stream-chunk")
    parser.add_argument("--fault", choices=[f.value for f in Fault], default=None)
    args = parser.parse_args(argv)
    behaviour = Behaviour(
        reply=args.reply,
        latency_ms=args.latency_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        stream_chunks=(args.stream_chunk,) * args.stream_count if args.stream_chunk else None,
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
