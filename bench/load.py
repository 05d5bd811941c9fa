"""A load generator for the VibectlLLMProxy service on 127.0.0.1 (vibectld or the floor).

Closed loop by default: N callers each send the next request as soon as the previous
one completes; `--rate R` sends R requests per second instead (open loop), for a client
that runs at a fixed pace. See bench/loadgen.py for what is counted.

Callers are asyncio tasks in this one process, spread round-robin over `--channels`
grpc.aio secure channels, each with its own TCP connection. The default is one
channel: on the machines we measured, more channels did not raise throughput,
because the client's cost is Python per call, not the connection. One process keeps
the client's CPU use to one core, leaving the others to the server under test.

A RESOURCE_EXHAUSTED refusal (a limit) counts as "refused", not as an error, so an
abusive client (`--burst N --rate R` past its rpm limit) can be driven with it.

The client secret is read from the environment variable named by `--secret-env`
(default VIBECTLD_BENCH_SECRET), so it never shows in `ps`.

    python -m bench.load --port P --ca ca.pem --mode unary --callers 16 --duration 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from bench import loadgen
from bench.loadgen import CallFailed, RunSpec, bounded
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
SECRET_ENV = "VIBECTLD_BENCH_SECRET"  # noqa: S105 - the variable's name, not a secret


def make_call(
    stubs: list[Any], secret: str, model: str, spec: RunSpec, prompt: str = "hello"
) -> loadgen.CallFn:
    metadata = (("authorization", f"Bearer {secret}"),)

    async def call(index: int, n: int) -> float:
        stub = stubs[index % len(stubs)]
        request = pb.ExecuteRequest(
            user_fragments=[prompt], model_name=model, request_id=f"bench-{index}-{n}"
        )
        t0 = time.perf_counter()
        try:
            if spec.mode == "unary":
                reply = await stub.Execute(request, metadata=metadata, timeout=spec.call_timeout)
                if reply.WhichOneof("result") != "success":
                    raise CallFailed("error", f"in-band error: {reply.error.error_code}")
                return 0.0
            call = stub.StreamExecute(request, metadata=metadata, timeout=spec.call_timeout)
            first: float | None = None
            seen: list[str] = []
            while True:
                chunk = await call.read()
                if chunk is grpc.aio.EOF:
                    break
                kind = chunk.WhichOneof("chunk_type")
                if kind == "text_chunk":
                    # The first text: an empty chunk (a role-only delta) does not count.
                    if first is None and chunk.text_chunk:
                        first = time.perf_counter() - t0
                else:
                    seen.append(kind)
            if first is None or seen != ["complete", "final_metrics"]:
                raise CallFailed("error", f"bad stream: first text {first}, then {seen}")
            return first
        except grpc.aio.AioRpcError as e:
            kind = "refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "error"
            raise CallFailed(kind, f"{e.code().name}: {e.details()}") from None

    return call


async def run_load(
    port: int, ca_pem: bytes, secret: str, model: str, channels: int, spec: RunSpec
) -> loadgen.Result:
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    # A local subchannel pool gives every channel its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    chans = [
        grpc.aio.secure_channel(f"{HOST}:{port}", creds, options=options) for _ in range(channels)
    ]
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.channel_ready() for c in chans))
        stubs = [pb_grpc.VibectlLLMProxyStub(c) for c in chans]
        return await loadgen.run(make_call(stubs, secret, model, spec), spec)
    finally:
        await asyncio.gather(*(c.close() for c in chans))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument(
        "--port", type=bounded(int, 1, 65535), required=True, help=f"the server's port on {HOST}"
    )
    parser.add_argument("--ca", type=Path, required=True, help="PEM CA that issued the server cert")
    parser.add_argument(
        "--secret-env", default=SECRET_ENV, help="environment variable holding the client secret"
    )
    parser.add_argument("--model", default="echo", help="the model to ask (default echo)")
    parser.add_argument("--channels", type=bounded(int, 1, 64), default=1)
    loadgen.add_run_arguments(parser)
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if not secret:
        parser.error(f"set {args.secret_env} to the client secret")
    spec = loadgen.spec_from(args)
    channels = min(args.channels, args.callers)
    result = asyncio.run(
        run_load(args.port, args.ca.read_bytes(), secret, args.model, channels, spec)
    )
    print(json.dumps(asdict(result)) if args.json else result.line(), flush=True)
    sys.exit(0 if result.count or result.refused else 1)


if __name__ == "__main__":
    main()
