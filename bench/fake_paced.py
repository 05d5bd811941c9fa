"""A paced OpenAI-compatible streaming endpoint that serves thousands of streams on little CPU.

`bench/fake_openai.py` runs a thread per connection, which is right for the tests
(faults, recording, a hang per connection) but costs it about 90 µs of CPU per
streamed chunk under the GIL: at 400 streams of a chunk every 20 ms it saturates its
own core and becomes what the streaming benchmark measures. This one is one asyncio
event loop: every reply is `--stream-count` chunks of `--stream-chunk` as SSE
`chat.completion.chunk` events with chunked transfer encoding, the first after
`--latency-ms` and the next every `--chunk-delay-ms`, with the finishing chunk, the
usage chunk (when `stream_options.include_usage` asks) and `[DONE]`. The events are
built once; one 1 ms timer writes whatever is due on every stream, so a chunk costs a
transport write. A request without `stream: true` gets the whole reply as one
completion. Connections are kept alive, TCP_NODELAY (asyncio's default).

    python -m bench.fake_paced --port 0 --latency-ms 20 --chunk-delay-ms 20 \\
        --stream-chunk " tok" --stream-count 50     # prints its port, serves until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections import defaultdict
from typing import Any

HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n"
)


def _frame(event: dict[str, Any] | str) -> bytes:
    payload = event if isinstance(event, str) else json.dumps(event)
    data = b"data: " + payload.encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class Reply:
    """Every byte of one paced reply, built once: the first write, each token, the tail."""

    def __init__(self, chunk: str, count: int) -> None:
        base = {"id": "chatcmpl-paced", "object": "chat.completion.chunk", "created": 0,
                "model": "fake", "system_fingerprint": None}  # fmt: skip

        def event(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**base, "choices": [choice]}

        self.count = count
        self.token = _frame(event({"content": chunk}))
        self.first = HEAD + _frame(event({"role": "assistant", "content": ""}))
        usage = {"prompt_tokens": 1, "completion_tokens": count, "total_tokens": count + 1}
        self.finish = _frame(event({}, "stop"))
        self.usage = _frame({**base, "choices": [], "usage": usage})
        self.done = _frame("[DONE]") + b"0\r\n\r\n"
        text = chunk * count
        message = {"role": "assistant", "content": text}
        whole = {"id": "chatcmpl-paced", "object": "chat.completion", "created": 0,
                 "model": "fake", "choices": [{"index": 0, "message": message,
                 "finish_reason": "stop"}], "usage": usage}  # fmt: skip
        body = json.dumps(whole).encode()
        self.completion = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )


class Pacer:
    """Writes what is due, once a millisecond; streams wait in buckets by due millisecond."""

    def __init__(self, reply: Reply, latency_ms: int, delay_ms: int) -> None:
        self.reply, self.latency_ms, self.delay_ms = reply, latency_ms, delay_ms
        self.due: defaultdict[int, list[tuple[Connection, int, bool]]] = defaultdict(list)
        self.cursor = 0
        self.served = 0

    def now_ms(self) -> int:
        return int(asyncio.get_running_loop().time() * 1000)

    def start(self, conn: Connection, usage: bool) -> None:
        self.served += 1
        self.due[self.now_ms() + self.latency_ms].append((conn, 0, usage))

    async def run(self) -> None:
        self.cursor = self.now_ms()
        while True:
            now = self.now_ms()
            for tick in range(self.cursor, now + 1):
                for conn, step, usage in self.due.pop(tick, ()):
                    self._step(conn, step, usage, tick)
            self.cursor = now + 1
            await asyncio.sleep(0.001)

    def _step(self, conn: Connection, step: int, usage: bool, tick: int) -> None:
        if conn.transport is None or conn.transport.is_closing():
            return
        r = self.reply
        out = r.token if step else r.first + r.token
        if step + 1 < r.count:
            conn.transport.write(out)
            self.due[tick + self.delay_ms].append((conn, step + 1, usage))
            return
        conn.transport.write(out + r.finish + (r.usage if usage else b"") + r.done)
        conn.busy = False
        conn.next_request()


class Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection: requests one after another."""

    def __init__(self, pacer: Pacer) -> None:
        self.pacer = pacer
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.next_request()

    def next_request(self) -> None:
        if self.busy or self.transport is None or (end := self.buf.find(b"\r\n\r\n")) < 0:
            return
        length = 0
        for line in bytes(self.buf[:end]).split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(self.buf) < end + 4 + length:
            return
        body = json.loads(bytes(self.buf[end + 4 : end + 4 + length]) or b"{}")
        del self.buf[: end + 4 + length]
        if not body.get("stream"):
            self.transport.write(self.pacer.reply.completion)
            self.next_request()
            return
        self.busy = True
        options = body.get("stream_options") or {}
        self.pacer.start(self, bool(options.get("include_usage")))


async def serve(args: argparse.Namespace) -> None:
    reply = Reply(args.stream_chunk, args.stream_count)
    pacer = Pacer(reply, round(args.latency_ms), max(round(args.chunk_delay_ms), 1))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Connection(pacer), args.host, args.port, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.create_task(pacer.run())
    await stop.wait()
    ticker.cancel()
    server.close()
    print(f"served {pacer.served} streams", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.fake_paced", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--latency-ms", type=float, default=20)
    p.add_argument("--chunk-delay-ms", type=float, default=20)
    p.add_argument("--stream-chunk", default=" tok")
    p.add_argument("--stream-count", type=int, default=50)
    asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
