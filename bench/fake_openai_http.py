"""The fake endpoint's HTTP side: one handler thread per connection, answering as told.

It reads the current `Behaviour` from its `FakeOpenAI` and records every request and
how every stream ended there (see fake_openai.py).
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, cast

from bench.fake_openai_spec import (
    CHAT_PATH,
    MODELS_PATH,
    Behaviour,
    End,
    Fault,
    RecordedRequest,
    ResponseEnd,
)

if TYPE_CHECKING:
    from bench.fake_openai import FakeOpenAI


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
