"""The floor: a bare grpc.aio server for the same service, with canned replies.

It does no authentication, validation, limiting, logging or model call, so the
difference between it and vibectld is what vibectld's own work costs per request.
It presents the same TLS certificate chain and uses the same server options as
vibectld, so the transport cost is identical.

    python -m bench.floor_server --port 0 --cert chain.pem --key server.key

With `--paced COUNT` a stream is COUNT messages of `--text`, the first after
`--interval-ms` and then one every `--interval-ms`, each its own message: what a relay
costs that sends every token of a paced provider as it comes, with no provider to read
(the streaming section's floor).

It prints the bound port on one line once it serves, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

MODEL = "echo"
WAYS = ("receive", "send")
# About the size of what the `echo` model answers to "hello", so both servers
# send the same number of bytes back.
CANNED_TEXT = (
    '{"prompt": "hello", "system": "", "attachments": [], "stream": false, "previous": []}'
)


class FloorService(pb_grpc.VibectlLLMProxyServicer):  # type: ignore[misc]
    """Answers every call with the same canned reply."""

    def __init__(self, text: str, paced: int = 0, interval_s: float = 0.0) -> None:
        self.text = text
        self.paced, self.interval_s = paced, interval_s

    def _metrics(self) -> Any:
        return pb.ExecutionMetrics(duration_ms=0, retry_count=0, timestamp=int(time.time()))

    async def Execute(self, request: Any, context: Any) -> Any:
        success = pb.ExecuteSuccess(
            response_text=self.text, metrics=self._metrics(), actual_model_used=MODEL
        )
        return pb.ExecuteResponse(request_id=request.request_id, success=success)

    async def StreamExecute(self, request: Any, context: Any) -> AsyncIterator[Any]:
        rid = request.request_id
        if not self.paced:
            yield pb.StreamChunk(request_id=rid, text_chunk=self.text)
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(1, self.paced + 1):
            # On the provider's schedule (bench/fake_paced.py), not 20 ms after each write:
            # a late write does not push the ones after it back.
            await asyncio.sleep(start + i * self.interval_s - loop.time())
            yield pb.StreamChunk(request_id=rid, text_chunk=self.text)
        yield pb.StreamChunk(request_id=rid, complete=pb.StreamComplete(actual_model_used=MODEL))
        yield pb.StreamChunk(request_id=rid, final_metrics=self._metrics())


async def serve(port: int, cert_chain: bytes, key: bytes, service: FloorService) -> None:
    # The same options vibectld's server uses (vibectld/grpc_server.py): its message limits
    # with the default max_request_bytes, and no SO_REUSEPORT.
    limit = 4 * 1024 * 1024
    options: list[tuple[str, int]] = [(f"grpc.max_{way}_message_length", limit) for way in WAYS]
    server = grpc.aio.server(options=[*options, ("grpc.so_reuseport", 0)])
    pb_grpc.add_VibectlLLMProxyServicer_to_server(service, server)
    creds = grpc.ssl_server_credentials([(key, cert_chain)])
    bound = server.add_secure_port(f"127.0.0.1:{port}", creds)
    if not bound:
        raise SystemExit(f"floor_server: cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(bound, flush=True)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floor_server", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--cert", type=Path, required=True, help="PEM certificate chain")
    parser.add_argument("--key", type=Path, required=True, help="PEM private key")
    parser.add_argument("--text", default=CANNED_TEXT, help="the canned reply text")
    parser.add_argument("--paced", type=int, default=0, help="messages per stream (0: one)")
    parser.add_argument("--interval-ms", type=float, default=20.0, help="between paced messages")
    args = parser.parse_args(argv)
    service = FloorService(args.text, args.paced, args.interval_ms / 1000)
    try:
        asyncio.run(serve(args.port, args.cert.read_bytes(), args.key.read_bytes(), service))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
