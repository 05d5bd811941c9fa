"""The load-generator core shared by bench.load (gRPC) and bench.provider_load (HTTP/llm).

A run drives one async `call` function from N callers, either closed-loop (each caller
sends the next request as soon as the previous one completes) or open-loop at a fixed
rate (a request is started every 1/rate s, whether or not earlier ones finished).
Requests that complete inside the measurement window (after the warm-up) are counted
and make the latency sample; no request starts after the window. The run ends by itself
at the end of the window, after `max_requests` requests, or at a hard deadline,
whichever comes first.

A call returns its time to the first text (streams) or 0.0, and raises `CallFailed`
when it did not succeed: kind "refused" (a limit said no, expected for an abusive
client) or "error" (anything else).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_CALLERS = 1024
MAX_DURATION = 600.0
MAX_IN_FLIGHT = 4096  # open-loop: more outstanding calls than this counts as an error


class CallFailed(Exception):
    """A call did not succeed; `kind` is "refused" or "error"."""

    def __init__(self, kind: str, what: str) -> None:
        super().__init__(what)
        self.kind = kind
        self.what = what


# (caller index, request number) -> time to first text in seconds (0.0 for unary calls).
CallFn = Callable[[int, int], Awaitable[float]]


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    # With RunSpec.keep_samples: (wall-clock start, latency) of each counted call.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    started: int = 0
    errors: int = 0
    refused: int = 0
    refused_in_window: int = 0
    error_samples: list[str] = field(default_factory=list)

    def failed(self, e: CallFailed, in_window: bool = False) -> None:
        if e.kind == "refused":
            self.refused += 1
            self.refused_in_window += in_window
            return
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(e.what[:300])


@dataclass(frozen=True)
class RunSpec:
    label: str
    mode: str  # "unary" or "stream"
    callers: int
    duration: float
    warmup: float
    max_requests: int = 5_000_000
    # Open loop: requests per second (callers is then only reported); None: closed loop.
    rate: float | None = None
    # Before the run proper, this many calls as fast as `callers` allow (not measured).
    burst: int = 0
    call_timeout: float = 10.0
    server_pid: int | None = None
    # Duty cycle: from the end of the warm-up, send for `on` seconds, pause for `off`,
    # and so on (None: send all the time).
    duty: tuple[float, float] | None = None
    # Keep every counted call's wall-clock start and latency in the result.
    keep_samples: bool = False

    def paused(self, t: float, measure_from: float) -> float:
        """0 when a call may start at perf-counter time t, else the seconds to wait."""
        if self.duty is None or t < measure_from:
            return 0.0
        on, off = self.duty
        phase = (t - measure_from) % (on + off)
        return 0.0 if phase < on else on + off - phase


@dataclass
class Result:
    label: str
    mode: str
    callers: int
    rate: float | None
    window_s: float
    count: int
    errors: int
    refused: int
    refused_per_s: float  # refusals of calls started in the measurement window
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    ttfc_p50_ms: float | None
    ttfc_p99_ms: float | None
    client_cpu_util: float
    client_cpu_us_per_req: float | None
    server_cpu_us_per_req: float | None
    error_samples: list[str]
    burst_s: float = 0.0
    # With keep_samples: [wall-clock start s, latency ms] of each counted call.
    samples: list[list[float]] | None = None
    # With a duty cycle: the wall-clock [start, end] of each sending period.
    on_windows: list[list[float]] | None = None

    def line(self) -> str:
        shape = f"rate={self.rate:g}/s" if self.rate else f"callers={self.callers}"
        text = (
            f"{self.label} {self.mode} {shape}: {self.count} ok in {self.window_s:.2f}s = "
            f"{self.rps:.0f} req/s, p50 {self.p50_ms:.3f} ms, p99 {self.p99_ms:.3f} ms"
        )
        if self.ttfc_p50_ms is not None:
            text += f", first text p50 {self.ttfc_p50_ms:.3f} ms"
        text += f", errors {self.errors}, refused {self.refused}"
        text += f", client cpu {self.client_cpu_util:.0%}"
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


async def _timed(
    call: CallFn, spec: RunSpec, index: int, n: int, samples: Samples, window: tuple[float, float]
) -> None:
    t0 = time.perf_counter()
    wall = time.time()
    try:
        async with asyncio.timeout(spec.call_timeout + 1):
            ttfc = await call(index, n)
    except CallFailed as e:
        samples.failed(e, window[0] <= t0 < window[1])
        return
    except TimeoutError:
        samples.failed(CallFailed("error", f"no answer within {spec.call_timeout:g} s"))
        return
    t1 = time.perf_counter()
    # Counted by completion: throughput is what finished inside the window (for calls as
    # slow as the window is long, counting only calls that also started in it would
    # undercount them).
    if window[0] <= t1 <= window[1]:
        samples.latencies.append(t1 - t0)
        if spec.mode == "stream":
            samples.ttfc.append(ttfc)
        if spec.keep_samples:
            samples.timeline.append((wall, t1 - t0))


async def _closed_caller(
    call: CallFn, spec: RunSpec, index: int, samples: Samples, window: tuple[float, float]
) -> None:
    n = 0
    while samples.started < spec.max_requests:
        now = time.perf_counter()
        if now >= window[1]:
            return
        wait = spec.paused(now, window[0])
        if wait:
            await asyncio.sleep(min(wait, window[1] - now))
            continue
        samples.started += 1
        n += 1
        await _timed(call, spec, index, n, samples, window)


async def _open_loop(
    call: CallFn, spec: RunSpec, samples: Samples, window: tuple[float, float]
) -> None:
    assert spec.rate is not None
    interval = 1.0 / spec.rate
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    n = 0
    while samples.started < spec.max_requests:
        due = start + n * interval
        now = time.perf_counter()
        if due >= window[1]:
            break
        if due > now:
            await asyncio.sleep(due - now)
        if spec.paused(due, window[0]):
            n += 1
            continue
        if len(tasks) >= MAX_IN_FLIGHT:
            samples.failed(CallFailed("error", f"more than {MAX_IN_FLIGHT} calls outstanding"))
        else:
            samples.started += 1
            task = asyncio.create_task(_timed(call, spec, n % spec.callers, n, samples, window))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.gather(*tasks)


async def _burst(call: CallFn, spec: RunSpec) -> None:
    """`spec.burst` calls from `spec.callers` closed-loop callers, outcomes ignored."""
    left = spec.burst

    async def caller(index: int) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                async with asyncio.timeout(spec.call_timeout + 1):
                    await call(index, -left)
            except (CallFailed, TimeoutError):
                pass

    await asyncio.gather(*(caller(i) for i in range(spec.callers)))


async def run(call: CallFn, spec: RunSpec) -> Result:
    """Drive `call` as `spec` says and summarise what was measured."""
    burst_s = 0.0
    if spec.burst:
        t = time.perf_counter()
        await _burst(call, spec)
        burst_s = time.perf_counter() - t
    samples = Samples()
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
    window = (measure_from, end)
    # The hard deadline: every call has its own timeout, this bounds the whole run.
    async with asyncio.timeout(spec.warmup + spec.duration + spec.call_timeout + 10):
        if spec.rate is not None:
            await _open_loop(call, spec, samples, window)
        else:
            await asyncio.gather(
                *(_closed_caller(call, spec, i, samples, window) for i in range(spec.callers))
            )
    finished = time.perf_counter()
    if "end" not in marks:
        mark("end")

    # Shorter than the duration only when max_requests ended the run early.
    window_s = max(min(end, finished) - measure_from, 1e-9)
    client_s: float | None = None
    server_s: float | None = None
    if "start" in marks:
        (c0, s0), (c1, s1) = marks["start"], marks["end"]
        client_s = c1 - c0
        if s0 is not None and s1 is not None:
            server_s = s1 - s0
    result = summarize(spec, samples, window_s, client_s, server_s, burst_s=burst_s)
    if spec.duty is not None:
        on, off = spec.duty
        offset = time.time() - time.perf_counter()
        starts = [
            measure_from + k * (on + off) for k in range(int(spec.duration // (on + off)) + 1)
        ]
        result.on_windows = [[t + offset, min(t + on, end) + offset] for t in starts if t < end]
    return result


def summarize(
    spec: RunSpec,
    samples: Samples,
    window_s: float,
    client_cpu_s: float | None,
    server_cpu_s: float | None,
    *,
    rps: float | None = None,
    burst_s: float = 0.0,
) -> Result:
    """A Result from samples: CPU seconds are those spent during the window."""
    count = len(samples.latencies)
    ms = [x * 1000 for x in samples.latencies]
    ttfc = [x * 1000 for x in samples.ttfc]
    stream = spec.mode == "stream"
    return Result(
        label=spec.label,
        mode=spec.mode,
        callers=spec.callers,
        rate=spec.rate,
        window_s=window_s,
        count=count,
        errors=samples.errors,
        refused=samples.refused,
        refused_per_s=samples.refused_in_window / window_s,
        rps=count / window_s if rps is None else rps,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=max(ms) if ms else float("nan"),
        ttfc_p50_ms=percentile(ttfc, 50) if stream else None,
        ttfc_p99_ms=percentile(ttfc, 99) if stream else None,
        client_cpu_util=(client_cpu_s or 0.0) / window_s,
        client_cpu_us_per_req=client_cpu_s / count * 1e6 if client_cpu_s and count else None,
        server_cpu_us_per_req=server_cpu_s / count * 1e6
        if server_cpu_s is not None and count
        else None,
        error_samples=samples.error_samples,
        burst_s=burst_s,
        samples=[[t, x * 1000] for t, x in samples.timeline] if spec.keep_samples else None,
    )


def bounded(kind: type[float] | type[int], low: float, high: float) -> Any:
    """An argparse type: a number of `kind` within [low, high]."""

    def conv(text: str) -> float | int:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return conv


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every load generator shares (they make a RunSpec)."""
    parser.add_argument("--mode", choices=("unary", "stream"), default="unary")
    parser.add_argument("--callers", type=bounded(int, 1, MAX_CALLERS), default=1)
    parser.add_argument(
        "--duration",
        type=bounded(float, 0.1, MAX_DURATION),
        default=5.0,
        help="measured seconds, after the warm-up",
    )
    parser.add_argument("--warmup", type=bounded(float, 0, 60), default=1.0)
    parser.add_argument("--max-requests", type=bounded(int, 1, 10**8), default=5_000_000)
    parser.add_argument(
        "--rate",
        type=bounded(float, 0.1, 100_000),
        default=None,
        help="open loop: start this many requests per second (default: closed loop)",
    )
    parser.add_argument(
        "--burst",
        type=bounded(int, 0, 10**7),
        default=0,
        help="first send this many requests as fast as --callers allow, unmeasured",
    )
    parser.add_argument(
        "--call-timeout",
        type=bounded(float, 0.1, 120),
        default=10.0,
        help="deadline of each call, in seconds",
    )
    parser.add_argument(
        "--server-pid",
        type=int,
        default=None,
        help="measure this process's CPU time per request (Linux /proc)",
    )
    parser.add_argument(
        "--duty",
        type=float,
        nargs=2,
        metavar=("ON", "OFF"),
        default=None,
        help="after the warm-up, send for ON seconds, pause for OFF seconds, and so on",
    )
    parser.add_argument(
        "--keep-samples",
        action="store_true",
        help="put every counted call's wall-clock start and latency in the JSON",
    )
    parser.add_argument("--label", default="", help="a name for the result")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def spec_from(args: argparse.Namespace) -> RunSpec:
    return RunSpec(
        label=args.label,
        mode=args.mode,
        callers=args.callers,
        duration=args.duration,
        warmup=args.warmup,
        max_requests=args.max_requests,
        rate=args.rate,
        burst=args.burst,
        call_timeout=args.call_timeout,
        server_pid=args.server_pid,
        duty=tuple(args.duty) if args.duty else None,
        keep_samples=args.keep_samples,
    )
