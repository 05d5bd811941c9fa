"""The benchmark's load generator: it calls targets (bench/clients.py) with a strategy.

- `closed` (the default), one target: N callers each send the next request as soon as
  the previous one completes; with `--rate R` a request starts every 1/R s instead,
  whether or not earlier ones finished (open loop), for a client that keeps a pace.
  `--burst`, `--duty`, `--max-requests` and `--keep-samples` shape or record such a run.
- `paired`, two or more targets: one caller sends single calls to each in turn, each
  round in random order, so all are measured under the same conditions, call by call.
  A call counts when it started and ended in the window; a target's req/s is its rate
  alone, 1 / mean latency; "client CPU" is this process's CPU during its calls.
- `sliced`, two or more targets: N closed-loop callers send to one target for
  `--slice` seconds, then all move to the next, and so on, so every target is measured
  in many short turns spread over the same stretch of time. A target's req/s is its
  completed calls over the time its turns lasted.

The machine drifts (other work comes and goes) by more than a fraction of a millisecond
or the few per cent a target allows between two runs seconds apart: `paired` and
`sliced` measure both sides of a comparison in the same seconds.

Calls that complete inside the measurement window (after the warm-up) are counted and
make the latency sample; no call starts after it. A server's CPU per call (a target's
`pid=`, from /proc) is its CPU over the window over the calls it answered. Callers are
asyncio tasks in this one process, which keeps the client to one core and leaves the
others to the servers under test. A gRPC secret is read from the environment variable
a target names (`secret-env=`, default VIBECTLD_BENCH_SECRET), so it never shows in `ps`.

    python -m bench.load --target name=vibectld,port=P,ca=ca.pem --callers 16 --json
    python -m bench.load --strategy sliced --callers 16 --slice 1 --duration 8 \\
        --target name=floor,port=F,ca=ca.pem,pid=1 --target name=vibectld,port=P,ca=ca.pem,pid=2
    python -m bench.load --strategy paired --target name=raw,client=raw,api-base=URL/v1 \\
        --target name=vibectld,port=P,ca=ca.pem,model=fake-gpt

With --json it prints one JSON object: each target's name and its bench.result.Result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.clients import CallFn, Target, connect, parse_target
from bench.result import CallFailed, Result, Samples, summarize

STRATEGIES = ("closed", "paired", "sliced")
MAX_IN_FLIGHT = 4096  # open loop: more outstanding calls than this counts as an error
Window = tuple[float, float]  # perf-counter start and end of the measurement


@dataclass(frozen=True)
class RunSpec:
    mode: str  # "unary" or "stream"
    callers: int
    duration: float
    warmup: float
    call_timeout: float = 10.0
    # Closed strategy only: stop after this many requests; open loop at `rate` per second;
    # first `burst` calls as fast as the callers allow (unmeasured); a duty cycle: from
    # the end of the warm-up, send for `on` seconds, pause for `off`, and so on.
    max_requests: int = 5_000_000
    rate: float | None = None
    burst: int = 0
    duty: tuple[float, float] | None = None
    keep_samples: bool = False
    slice_s: float = 1.0  # sliced strategy: the length of one target's turn

    def paused(self, t: float, measure_from: float) -> float:
        """0 when a call may start at perf-counter time t, else the seconds to wait."""
        if self.duty is None or t < measure_from:
            return 0.0
        on, off = self.duty
        phase = (t - measure_from) % (on + off)
        return 0.0 if phase < on else on + off - phase

    def window(self) -> Window:
        measure_from = time.perf_counter() + self.warmup
        return measure_from, measure_from + self.duration

    def deadline(self) -> asyncio.Timeout:
        """Every call has its own timeout: this bounds the whole run."""
        return asyncio.timeout(self.warmup + self.duration + self.call_timeout + 10)


def process_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process (all its threads), from /proc; None if unreadable."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    # After the command name: state is field 3, utime 14 and stime 15 (1-based).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spent(before: float | None, pid: int | None) -> float | None:
    after = process_cpu_seconds(pid)
    return after - before if after is not None and before is not None else None


async def _timed(
    call: CallFn,
    spec: RunSpec,
    index: int,
    n: int,
    samples: Samples,
    window: Window,
    whole: bool = False,
) -> bool:
    """One call; True when it counted: it completed in the window (`whole`: and began)."""
    t0 = time.perf_counter()
    wall = time.time() if spec.keep_samples else None
    try:
        async with asyncio.timeout(spec.call_timeout + 1):
            ttfc = await call(index, n)
    except CallFailed as e:
        samples.failed(e, window[0] <= t0 < window[1])
        return False
    except TimeoutError:
        samples.failed(CallFailed("error", f"no answer within {spec.call_timeout:g} s"))
        return False
    t1 = time.perf_counter()
    # Counted by completion: throughput is what finished inside the window (for calls as
    # slow as the window is long, counting only calls that also started in it would
    # undercount them).
    if window[0] <= t1 <= window[1] and (window[0] <= t0 or not whole):
        samples.counted(t1 - t0, ttfc, spec.mode == "stream", wall)
        return True
    return False


async def _closed_caller(
    call: CallFn, spec: RunSpec, index: int, samples: Samples, window: Window
) -> None:
    n = 0
    while samples.started < spec.max_requests:
        now = time.perf_counter()
        if now >= window[1]:
            return
        if wait := spec.paused(now, window[0]):
            await asyncio.sleep(min(wait, window[1] - now))
            continue
        samples.started += 1
        n += 1
        await _timed(call, spec, index, n, samples, window)


async def _open_loop(call: CallFn, spec: RunSpec, samples: Samples, window: Window) -> None:
    assert spec.rate is not None
    interval = 1.0 / spec.rate
    tasks: set[asyncio.Task[bool]] = set()
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


async def _burst(call: CallFn, spec: RunSpec) -> float:
    """`spec.burst` calls from `spec.callers` closed-loop callers, outcomes ignored; seconds."""
    t = time.perf_counter()
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
    return time.perf_counter() - t


async def closed(target: Target, call: CallFn, spec: RunSpec) -> Result:
    """The closed (or, with a rate, open) loop against one target."""
    burst_s = await _burst(call, spec) if spec.burst else 0.0
    samples = Samples()
    window = spec.window()
    loop = asyncio.get_running_loop()
    marks: dict[str, tuple[float, float | None]] = {}

    def mark(name: str) -> None:
        marks[name] = (time.process_time(), process_cpu_seconds(target.pid))

    loop.call_at(loop.time() + spec.warmup, mark, "start")
    loop.call_at(loop.time() + spec.warmup + spec.duration, mark, "end")
    async with spec.deadline():
        if spec.rate is not None:
            await _open_loop(call, spec, samples, window)
        else:
            callers = (_closed_caller(call, spec, i, samples, window) for i in range(spec.callers))
            await asyncio.gather(*callers)
    finished = time.perf_counter()
    if "end" not in marks:
        mark("end")
    # Shorter than the duration only when max_requests ended the run early.
    window_s = max(min(window[1], finished) - window[0], 1e-9)
    client_s = server_s = None
    if "start" in marks:
        (c0, s0), (c1, s1) = marks["start"], marks["end"]
        client_s = c1 - c0
        server_s = s1 - s0 if s0 is not None and s1 is not None else None
    result = summarize(
        target.name, spec.mode, spec.callers, samples, window_s, client_cpu_s=client_s,
        server_cpu_s=server_s, rate=spec.rate, burst_s=burst_s, keep_samples=spec.keep_samples,
    )  # fmt: skip
    if spec.duty is not None:
        on, off = spec.duty
        offset = time.time() - time.perf_counter()
        turns = (window[0] + k * (on + off) for k in range(int(spec.duration // (on + off)) + 1))
        ends = window[1]
        result.on_windows = [[t + offset, min(t + on, ends) + offset] for t in turns if t < ends]
    return result


async def paired(targets: list[Target], calls: dict[str, CallFn], spec: RunSpec) -> list[Result]:
    """One caller alternating single calls between the targets."""
    samples = {t.name: Samples() for t in targets}
    client_cpu = {t.name: 0.0 for t in targets}
    window = spec.window()
    cpu0: dict[str, float | None] = {}
    names = list(calls)
    n = 0
    async with spec.deadline():
        while time.perf_counter() < window[1]:
            if not cpu0 and time.perf_counter() >= window[0]:
                cpu0 = {t.name: process_cpu_seconds(t.pid) for t in targets}
            random.shuffle(names)
            for name in names:
                n += 1
                c0 = time.process_time()
                if await _timed(calls[name], spec, 0, n, samples[name], window, whole=True):
                    client_cpu[name] += time.process_time() - c0
    window_s = max(time.perf_counter() - window[0], 1e-9)
    results = []
    for t in targets:
        got = samples[t.name]
        busy = sum(got.latencies)
        cpu = _spent(cpu0.get(t.name), t.pid)
        rps = len(got.latencies) / busy if busy else 0.0
        r = summarize(t.name, spec.mode, 1, got, window_s, client_cpu_s=client_cpu[t.name],
                      server_cpu_s=cpu, rps=rps)  # fmt: skip
        results.append(r)
    return results


async def sliced(targets: list[Target], calls: dict[str, CallFn], spec: RunSpec) -> list[Result]:
    """Closed-loop callers that move from target to target every `spec.slice_s`."""
    names = list(calls)
    samples = {name: Samples() for name in names}
    turn_time = dict.fromkeys(names, 0.0)
    window = spec.window()
    current = [names[0]]
    cpu0: dict[str, float | None] = {}

    async def caller(index: int) -> None:
        n = 0
        while time.perf_counter() < window[1]:
            name = current[0]
            n += 1
            await _timed(calls[name], spec, index, n, samples[name], window)

    async def switcher() -> None:
        # The warm-up rotates too; a turn boundary falls on the window's start.
        k = 0
        while (now := time.perf_counter()) < window[1]:
            if now >= window[0] and not cpu0:
                cpu0.update((t.name, process_cpu_seconds(t.pid)) for t in targets)
            name = current[0] = names[k % len(names)]
            stop = min(now + spec.slice_s, window[1])
            if now < window[0] < stop:
                stop = window[0]
            await asyncio.sleep(stop - now)
            if now >= window[0]:
                turn_time[name] += time.perf_counter() - now
            k += 1

    async with spec.deadline():
        await asyncio.gather(switcher(), *(caller(i) for i in range(spec.callers)))
    results = []
    for t in targets:
        got, turns = samples[t.name], turn_time[t.name]
        cpu = _spent(cpu0.get(t.name), t.pid)
        rps = len(got.latencies) / turns if turns else 0.0
        r = summarize(t.name, spec.mode, spec.callers, got, turns or 1e-9, server_cpu_s=cpu,
                      rps=rps)  # fmt: skip
        results.append(r)
    return results


async def run(strategy: str, targets: list[Target], spec: RunSpec) -> list[Result]:
    """Connect to every target, then drive them with the strategy."""
    async with AsyncExitStack() as stack:
        calls: dict[str, CallFn] = {}
        for t in targets:
            call, close = await connect(t, spec.mode, spec.callers, spec.call_timeout)
            stack.push_async_callback(close)
            calls[t.name] = call
        if strategy == "closed":
            return [await closed(targets[0], calls[targets[0].name], spec)]
        if strategy == "paired":
            return await paired(targets, calls, spec)
        return await sliced(targets, calls, spec)
    raise AssertionError("unreachable")


def bounded(kind: type[float] | type[int], low: float, high: float) -> Any:
    """An argparse type: a number of `kind` within [low, high]."""

    def conv(text: str) -> float | int:
        value = kind(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}")
        return value

    return conv


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add("--strategy", choices=STRATEGIES, default="closed")
    add("--target", type=parse_target, action="append", required=True, help=parse_target.__doc__)
    add("--mode", choices=("unary", "stream"), default="unary")
    add("--callers", type=bounded(int, 1, 1024), default=1)
    add("--duration", type=bounded(float, 0.1, 600), default=5.0, help="measured seconds")
    add("--warmup", type=bounded(float, 0, 60), default=1.0, help="seconds before the window")
    add("--call-timeout", type=bounded(float, 0.1, 120), default=10.0, help="seconds per call")
    add("--slice", type=bounded(float, 0.1, 60), default=1.0, help="sliced: seconds per turn")
    add("--max-requests", type=bounded(int, 1, 10**8), default=5_000_000)
    add("--rate", type=bounded(float, 0.1, 100_000), default=None, help="open loop: calls/s")
    add("--burst", type=bounded(int, 0, 10**7), default=0, help="first N calls, unmeasured")
    add(
        "--duty",
        type=float,
        nargs=2,
        metavar=("ON", "OFF"),
        default=None,
        help="send ON s, pause OFF s",
    )
    add("--keep-samples", action="store_true", help="each counted call's start and latency")
    add("--json", action="store_true", help="print the results as JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    targets: list[Target] = args.target
    names = [t.name for t in targets]
    if args.strategy == "closed" and len(targets) != 1:
        parser.error("the closed strategy calls exactly one --target")
    if args.strategy != "closed" and (len(targets) < 2 or len(set(names)) != len(names)):
        parser.error(f"{args.strategy}: give at least two --target, with different names")
    if args.strategy == "paired" and args.callers != 1:
        parser.error("paired: one caller alternates between the targets (no --callers)")
    spec = RunSpec(
        args.mode, args.callers, args.duration, args.warmup, args.call_timeout,
        args.max_requests, args.rate, args.burst, tuple(args.duty) if args.duty else None,
        args.keep_samples, args.slice,
    )  # fmt: skip
    results = asyncio.run(run(args.strategy, targets, spec))
    if args.json:
        print(json.dumps({r.label: asdict(r) for r in results}), flush=True)
    else:
        for r in results:
            print(r.line(), flush=True)
    ok = all(r.count or (args.strategy == "closed" and r.refused) for r in results)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
