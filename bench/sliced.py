"""Time-sliced throughput: one closed-loop load that moves between gRPC servers.

The machine this runs on drifts (other work comes and goes) by more than the few per
cent a throughput target allows between two runs taken seconds apart. Here N callers
send to one server for `--slice` seconds, then all move to the next, and so on, so
every server is measured in many short turns spread over the same stretch of time.
A call counts for the server it was sent to; a server's req/s is its completed calls
over the time its turns lasted, and its CPU per call is its CPU over the whole window
(it idles while the others have their turn) over its calls.

    python -m bench.sliced --callers 16 --slice 1 --duration 8 --json \\
        --target floor:PORT:ca.pem:SECRET_ENV:PID --target vibectld:PORT:ca.pem:SECRET_ENV:PID

SECRET_ENV names an environment variable holding that server's client secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from bench import loadgen
from bench.load import make_call
from bench.loadgen import CallFailed, CallFn, RunSpec, Samples, bounded, process_cpu_seconds
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

HOST = "127.0.0.1"


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    ca: Path
    secret: str
    pid: int | None


def parse_target(text: str) -> Target:
    parts = text.split(":")
    if len(parts) not in (4, 5) or not parts[1].isdigit():
        raise argparse.ArgumentTypeError("expected NAME:PORT:CA_FILE:SECRET_ENV[:PID]")
    secret = os.environ.get(parts[3])
    if not secret:
        raise argparse.ArgumentTypeError(f"the environment variable {parts[3]} is not set")
    pid = int(parts[4]) if len(parts) == 5 else None
    return Target(parts[0], int(parts[1]), Path(parts[2]), secret, pid)


async def _sliced(
    calls: dict[str, CallFn], pids: dict[str, int | None], spec: RunSpec, slice_s: float
) -> dict[str, loadgen.Result]:
    names = list(calls)
    samples = {name: Samples() for name in names}
    turn_time = dict.fromkeys(names, 0.0)
    start = time.perf_counter()
    measure_from = start + spec.warmup
    end = measure_from + spec.duration
    current = [names[0]]
    cpu0: dict[str, float | None] = {}

    async def caller(index: int) -> None:
        n = 0
        while time.perf_counter() < end:
            name = current[0]
            n += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(spec.call_timeout + 1):
                    ttfc = await calls[name](index, n)
            except CallFailed as e:
                samples[name].failed(e, measure_from <= t0 < end)
                continue
            except TimeoutError:
                samples[name].failed(CallFailed("error", "no answer in time"))
                continue
            t1 = time.perf_counter()
            if measure_from <= t1 <= end:
                samples[name].latencies.append(t1 - t0)
                if spec.mode == "stream":
                    samples[name].ttfc.append(ttfc)

    async def switcher() -> None:
        # The warm-up rotates too; a turn boundary falls on measure_from.
        k = 0
        while (now := time.perf_counter()) < end:
            if now >= measure_from and not cpu0:
                for name, pid in pids.items():
                    cpu0[name] = process_cpu_seconds(pid) if pid else None
            name = names[k % len(names)]
            current[0] = name
            stop = min(now + slice_s, end)
            if now < measure_from < stop:
                stop = measure_from
            await asyncio.sleep(stop - now)
            if now >= measure_from:
                turn_time[name] += time.perf_counter() - now
            k += 1

    async with asyncio.timeout(spec.warmup + spec.duration + spec.call_timeout + 10):
        await asyncio.gather(switcher(), *(caller(i) for i in range(spec.callers)))
    results: dict[str, loadgen.Result] = {}
    for name in names:
        pid = pids.get(name)
        before, after = cpu0.get(name), process_cpu_seconds(pid) if pid else None
        count = len(samples[name].latencies)
        results[name] = loadgen.summarize(
            RunSpec(name, spec.mode, spec.callers, spec.duration, spec.warmup),
            samples[name],
            turn_time[name] or 1e-9,
            None,
            after - before if after is not None and before is not None else None,
            rps=count / turn_time[name] if turn_time[name] else 0.0,
        )
    return results


async def run_sliced(
    targets: list[Target], spec: RunSpec, slice_s: float, model: str
) -> dict[str, loadgen.Result]:
    channels = []
    calls: dict[str, CallFn] = {}
    options = [("grpc.use_local_subchannel_pool", 1)]
    for t in targets:
        creds = grpc.ssl_channel_credentials(root_certificates=t.ca.read_bytes())
        channel = grpc.aio.secure_channel(f"{HOST}:{t.port}", creds, options=options)
        channels.append(channel)
        calls[t.name] = make_call([pb_grpc.VibectlLLMProxyStub(channel)], t.secret, model, spec)
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.channel_ready() for c in channels))
        return await _sliced(calls, {t.name: t.pid for t in targets}, spec, slice_s)
    finally:
        await asyncio.gather(*(c.close() for c in channels))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sliced",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", type=parse_target, action="append", required=True)
    parser.add_argument("--model", default="echo")
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument("--callers", type=bounded(int, 1, 1024), default=16)
    parser.add_argument("--slice", type=bounded(float, 0.1, 60), default=1.0)
    parser.add_argument("--duration", type=bounded(float, 0.1, 600), default=8.0)
    parser.add_argument("--warmup", type=bounded(float, 0, 60), default=1.0)
    parser.add_argument("--call-timeout", type=bounded(float, 0.1, 120), default=10.0)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    names = [t.name for t in args.target]
    if len(set(names)) != len(names) or len(names) < 2:
        parser.error("give at least two --target, with different names")
    spec = RunSpec(
        "sliced",
        args.mode,
        args.callers,
        args.duration,
        args.warmup,
        call_timeout=args.call_timeout,
    )
    results = asyncio.run(run_sliced(args.target, spec, args.slice, args.model))
    if args.json:
        print(json.dumps({name: asdict(r) for name, r in results.items()}), flush=True)
    else:
        for r in results.values():
            print(r.line(), flush=True)
    sys.exit(0 if all(r.count for r in results.values()) else 1)


if __name__ == "__main__":
    main()
