"""Paired latency at 1 caller: one process alternates calls between two targets.

A latency target of a fraction of a millisecond (or of 2 ms on a 25 ms call) is smaller
than what a busy 2-core machine drifts by between two runs a few seconds apart. Here
one caller sends its calls to two targets in turn (each pair in random order), so both
are measured under the same conditions, call by call:

- `--floor-port`: the floor server (gRPC) against vibectld (gRPC), same model;
- `--api-base`: a raw HTTP client to the provider (see bench.provider_load `raw`)
  against vibectld serving that provider as `--model`.

Every call's wall time counts for its target; each target's req/s is its rate alone,
1 / mean latency; "client CPU" is this process's CPU during that target's calls, and
"server CPU" a server's CPU during the window per call it answered (it is idle while
the other target is called).

    python -m bench.paired --vibectld-port P --ca ca.pem --floor-port F --mode unary --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import grpc

from bench import loadgen
from bench.load import SECRET_ENV, make_call
from bench.loadgen import CallFailed, CallFn, RunSpec, Samples, bounded, process_cpu_seconds
from bench.provider_load import raw_client
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

HOST = "127.0.0.1"


async def _alternate(
    calls: dict[str, CallFn], pids: dict[str, int | None], spec: RunSpec
) -> dict[str, loadgen.Result]:
    samples = {name: Samples() for name in calls}
    client_cpu = dict.fromkeys(calls, 0.0)
    start = time.perf_counter()
    measure_from = start + spec.warmup
    end = measure_from + spec.duration
    server_cpu: dict[str, float | None] = {}
    names = list(calls)
    n = 0
    marked = False
    async with asyncio.timeout(spec.warmup + spec.duration + spec.call_timeout + 10):
        while time.perf_counter() < end:
            if not marked and time.perf_counter() >= measure_from:
                marked = True
                for name, pid in pids.items():
                    server_cpu[name] = process_cpu_seconds(pid) if pid else None
            random.shuffle(names)
            for name in names:
                n += 1
                c0, t0 = time.process_time(), time.perf_counter()
                try:
                    async with asyncio.timeout(spec.call_timeout + 1):
                        ttfc = await calls[name](0, n)
                except CallFailed as e:
                    samples[name].failed(e, measure_from <= t0 < end)
                    continue
                except TimeoutError:
                    samples[name].failed(CallFailed("error", "no answer in time"))
                    continue
                t1 = time.perf_counter()
                if measure_from <= t0 and t1 <= end:
                    samples[name].latencies.append(t1 - t0)
                    if spec.mode == "stream":
                        samples[name].ttfc.append(ttfc)
                    client_cpu[name] += time.process_time() - c0
    window_s = max(time.perf_counter() - measure_from, 1e-9)
    results: dict[str, loadgen.Result] = {}
    for name in calls:
        before = server_cpu.get(name)
        pid = pids.get(name)
        after = process_cpu_seconds(pid) if pid else None
        busy = sum(samples[name].latencies)
        results[name] = loadgen.summarize(
            RunSpec(name, spec.mode, 1, spec.duration, spec.warmup),
            samples[name],
            window_s,
            client_cpu[name],
            after - before if after is not None and before is not None else None,
            rps=len(samples[name].latencies) / busy if busy else 0.0,
        )
    return results


async def run_paired(args: argparse.Namespace, secret: str) -> dict[str, loadgen.Result]:
    spec = RunSpec(
        "paired", args.mode, 1, args.duration, args.warmup, call_timeout=args.call_timeout
    )
    creds = grpc.ssl_channel_credentials(root_certificates=args.ca.read_bytes())
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels: list[grpc.aio.Channel] = []

    def stub(port: int) -> object:
        channel = grpc.aio.secure_channel(f"{HOST}:{port}", creds, options=options)
        channels.append(channel)
        return pb_grpc.VibectlLLMProxyStub(channel)

    calls: dict[str, CallFn] = {}
    pids: dict[str, int | None] = {"vibectld": args.vibectld_pid}
    closers = []
    if args.floor_port:
        calls["floor"] = make_call([stub(args.floor_port)], secret, args.model, spec)
        pids["floor"] = args.floor_pid
    if args.api_base:
        raw, close = raw_client(args.api_base, spec)
        calls["raw"] = raw
        closers.append(close)
    calls["vibectld"] = make_call([stub(args.vibectld_port)], secret, args.model, spec)
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.channel_ready() for c in channels))
        return await _alternate(calls, pids, spec)
    finally:
        await asyncio.gather(*(c.close() for c in channels))
        for close in closers:
            await close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.paired",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vibectld-port", type=bounded(int, 1, 65535), required=True)
    parser.add_argument("--vibectld-pid", type=int, default=None)
    parser.add_argument("--ca", type=Path, required=True, help="PEM CA of the gRPC servers")
    parser.add_argument("--floor-port", type=bounded(int, 1, 65535), default=None)
    parser.add_argument("--floor-pid", type=int, default=None)
    parser.add_argument("--api-base", default=None, help="the provider, for the raw client")
    parser.add_argument("--model", default="echo", help="the model vibectld is asked for")
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument("--duration", type=bounded(float, 0.1, 600), default=5.0)
    parser.add_argument("--warmup", type=bounded(float, 0, 60), default=1.0)
    parser.add_argument("--call-timeout", type=bounded(float, 0.1, 120), default=10.0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if bool(args.floor_port) == bool(args.api_base):
        parser.error("give exactly one of --floor-port and --api-base")
    if args.api_base and not args.api_base.startswith("http://127."):
        parser.error("--api-base must be a loopback http:// URL")
    secret = os.environ.get(SECRET_ENV)
    if not secret:
        parser.error(f"set {SECRET_ENV} to the client secret")
    results = asyncio.run(run_paired(args, secret))
    if args.json:
        print(json.dumps({name: asdict(r) for name, r in results.items()}), flush=True)
    else:
        for r in results.values():
            print(r.line(), flush=True)
    sys.exit(0 if all(r.count for r in results.values()) else 1)


if __name__ == "__main__":
    main()
