"""A closed-loop load generator for the VibectlLLMProxy service on 127.0.0.1.

N callers each send the next request as soon as the previous one completes.
Requests that start after the warm-up and finish before the end of the
measurement window are counted; callers stop by themselves at the end of the
window, after `--max-requests` requests, or at the hard deadline, whichever
comes first.

Callers are asyncio tasks in this one process, spread round-robin over
`--channels` grpc.aio secure channels, each with its own TCP connection. The
default is one channel: on the machines we measured, more channels did not raise
throughput, because the client's cost is Python per call, not the connection
(`python -m bench.load --channels 4 ...` to compare). One process keeps the
client's CPU use to one core, leaving the others to the server under test.

The client secret is read from the environment variable named by
`--secret-env` (default VIBECTLD_BENCH_SECRET), so it never shows in `ps`.

    python -m bench.load --port P --ca ca.pem --mode unary --callers 16 --duration 5 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
MODES = ("unary", "stream")
MAX_CALLERS = 1024
MAX_DURATION = 600.0
SECRET_ENV = "VIBECTLD_BENCH_SECRET"  # noqa: S105 - the variable's name, not a secret


@dataclass
class _Samples:
    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    started: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(what)


@dataclass
class Result:
    mode: str
    callers: int
    channels: int
    window_s: float
    count: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    ttfc_p50_ms: float | None
    ttfc_p99_ms: float | None
    client_cpu_util: float
    server_cpu_us_per_req: float | None
    error_samples: list[str]

    def line(self) -> str:
        text = (
            f"{self.mode} callers={self.callers} channels={self.channels}: "
            f"{self.count} ok in {self.window_s:.2f}s = {self.rps:.0f} req/s, "
            f"p50 {self.p50_ms:.3f} ms, p99 {self.p99_ms:.3f} ms"
        )
        if self.ttfc_p50_ms is not None:
            text += f", first chunk p50 {self.ttfc_p50_ms:.3f} ms"
        text += f", errors {self.errors}, client cpu {self.client_cpu_util:.0%}"
        if self.server_cpu_us_per_req is not None:
            text += f", server cpu {self.server_cpu_us_per_req:.0f} us/req"
        return text


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None if unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class LoadSpec:
    port: int
    ca_pem: bytes
    secret: str
    mode: str
    callers: int
    duration: float
    warmup: float
    channels: int
    max_requests: int
    call_timeout: float
    server_pid: int | None


async def _call_once(stub: Any, spec: LoadSpec, request: Any, samples: _Samples) -> float | None:
    """One request; its time to first text chunk (streams) or 0.0, or None on failure."""
    metadata = (("authorization", f"Bearer {spec.secret}"),)
    t0 = time.perf_counter()
    try:
        if spec.mode == "unary":
            reply = await stub.Execute(request, metadata=metadata, timeout=spec.call_timeout)
            if reply.WhichOneof("result") != "success":
                samples.error(f"in-band error: {reply.error.error_code}")
                return None
            return 0.0
        call = stub.StreamExecute(request, metadata=metadata, timeout=spec.call_timeout)
        first: float | None = None
        seen: list[str] = []
        while True:
            chunk = await call.read()
            if chunk is grpc.aio.EOF:
                break
            kind = chunk.WhichOneof("chunk_type")
            if kind == "text_chunk" and first is None:
                first = time.perf_counter() - t0
            elif kind != "text_chunk":
                seen.append(kind)
        if first is None or seen != ["complete", "final_metrics"]:
            samples.error(f"bad stream: first chunk {first}, then {seen}")
            return None
        return first
    except grpc.aio.AioRpcError as e:
        samples.error(f"{e.code().name}: {e.details()}")
        return None


async def _caller(
    stub: Any, spec: LoadSpec, index: int, samples: _Samples, measure_from: float, end: float
) -> None:
    n = 0
    while samples.started < spec.max_requests:
        t0 = time.perf_counter()
        if t0 >= end:
            return
        samples.started += 1
        n += 1
        request = pb.ExecuteRequest(
            user_fragments=["hello"], model_name="echo", request_id=f"bench-{index}-{n}"
        )
        ttfc = await _call_once(stub, spec, request, samples)
        t1 = time.perf_counter()
        if ttfc is not None and t0 >= measure_from and t1 <= end:
            samples.latencies.append(t1 - t0)
            if spec.mode == "stream":
                samples.ttfc.append(ttfc)


async def run_load(spec: LoadSpec) -> Result:
    creds = grpc.ssl_channel_credentials(root_certificates=spec.ca_pem)
    # A local subchannel pool gives every channel its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.secure_channel(f"{HOST}:{spec.port}", creds, options=options)
        for _ in range(spec.channels)
    ]
    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.channel_ready() for c in channels))
        stubs = [pb_grpc.VibectlLLMProxyStub(c) for c in channels]
        samples = _Samples()
        start = time.perf_counter()
        measure_from = start + spec.warmup
        end = measure_from + spec.duration
        loop = asyncio.get_running_loop()

        marks: dict[str, tuple[float, float | None]] = {}

        def mark(name: str) -> None:
            server = process_cpu_seconds(spec.server_pid) if spec.server_pid else None
            marks[name] = (time.process_time(), server)

        loop.call_at(loop.time() + spec.warmup, mark, "start")
        loop.call_at(loop.time() + spec.warmup + spec.duration, mark, "end")
        # The hard deadline: every call has its own timeout, this bounds the whole run.
        async with asyncio.timeout(spec.warmup + spec.duration + spec.call_timeout + 10):
            await asyncio.gather(
                *(
                    _caller(stubs[i % len(stubs)], spec, i, samples, measure_from, end)
                    for i in range(spec.callers)
                )
            )
        finished = time.perf_counter()
        if "end" not in marks:
            mark("end")
    finally:
        await asyncio.gather(*(c.close() for c in channels))

    client_util = 0.0
    server_us: float | None = None
    count = len(samples.latencies)
    # Shorter than --duration only when --max-requests ended the run early.
    window = max(min(end, finished) - measure_from, 1e-9)
    if "start" in marks:
        (c0, s0), (c1, s1) = marks["start"], marks["end"]
        client_util = (c1 - c0) / window
        if s0 is not None and s1 is not None and count:
            server_us = (s1 - s0) / count * 1e6
    ms = [x * 1000 for x in samples.latencies]
    ttfc = [x * 1000 for x in samples.ttfc]
    stream = spec.mode == "stream"
    return Result(
        mode=spec.mode,
        callers=spec.callers,
        channels=spec.channels,
        window_s=window,
        count=count,
        errors=samples.errors,
        rps=count / window,
        p50_ms=percentile(ms, 50),
        p99_ms=percentile(ms, 99),
        ttfc_p50_ms=percentile(ttfc, 50) if stream else None,
        ttfc_p99_ms=percentile(ttfc, 99) if stream else None,
        client_cpu_util=client_util,
        server_cpu_us_per_req=server_us,
        error_samples=samples.error_samples,
    )


def _bounded(kind: type[float] | type[int], low: float, high: float) -> Any:
    def conv(text: str) -> float | int:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return conv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__)
    parser.add_argument(
        "--port", type=_bounded(int, 1, 65535), required=True, help=f"the server's port on {HOST}"
    )
    parser.add_argument("--ca", type=Path, required=True, help="PEM CA that issued the server cert")
    parser.add_argument(
        "--secret-env", default=SECRET_ENV, help="environment variable holding the client secret"
    )
    parser.add_argument("--mode", choices=MODES, default="unary")
    parser.add_argument("--callers", type=_bounded(int, 1, MAX_CALLERS), default=1)
    parser.add_argument("--channels", type=_bounded(int, 1, 64), default=1)
    parser.add_argument(
        "--duration",
        type=_bounded(float, 0.1, MAX_DURATION),
        default=5.0,
        help="measured seconds, after the warm-up",
    )
    parser.add_argument("--warmup", type=_bounded(float, 0, 60), default=1.0)
    parser.add_argument("--max-requests", type=_bounded(int, 1, 10**8), default=5_000_000)
    parser.add_argument(
        "--call-timeout",
        type=_bounded(float, 0.1, 120),
        default=10.0,
        help="deadline of each call, in seconds",
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="measure this process's CPU time per request (Linux /proc)",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    secret = os.environ.get(args.secret_env)
    if not secret:
        parser.error(f"set {args.secret_env} to the client secret")
    spec = LoadSpec(
        port=args.port,
        ca_pem=args.ca.read_bytes(),
        secret=secret,
        mode=args.mode,
        callers=args.callers,
        duration=args.duration,
        warmup=args.warmup,
        channels=min(args.channels, args.callers),
        max_requests=args.max_requests,
        call_timeout=args.call_timeout,
        server_pid=args.server_pid,
    )
    result = asyncio.run(run_load(spec))
    print(json.dumps(asdict(result)) if args.json else result.line(), flush=True)
    sys.exit(0 if result.count else 1)


if __name__ == "__main__":
    main()
