"""Many concurrent token streams at a provider's pace: the streaming section's load.

A worker process (`python -m bench.streams`) keeps `--streams` streams open, each slot
opening the next as soon as its previous one ends (closed loop), against vibectld
(`--client grpc`: grpc.aio, one connection per `--per-channel` streams) or straight
against the fake provider (`--client raw`: aiohttp, one kept-alive HTTP connection per
stream, the SSE parsed line by line). It connects, prints `ready`, reads the wall-clock
start time from stdin, starts its slots spread over `--ramp` seconds (so they do not
stay in lock-step), and after `--warmup` seconds measures for `--duration`: the tokens
(provider chunks) that arrived, each stream's time to first token, the gaps between
consecutive messages of a stream, errors, and its own CPU. It prints one JSON line.

The paced reply is `TOKENS` chunks of `TOKEN`, so a client counts the provider's chunks
in whatever text it gets: vibectld may send several of them in one message.

`measure()` runs as many workers as the streams need (STREAMS_PER_PROCESS each, so no
worker's event loop is the bottleneck), starts them together, reads the daemon's CPU
time (/proc/PID/stat) at the window's edges and its RSS during it, and merges. The
daemon is its process and every descendant (with `server.workers` > 1, the serving
processes): CPU and RSS are summed over them.
`never_read()` holds streams open without reading them (the slow-reader measurement).

Not a strategy of bench.load: what it measures is per token and per gap across several
worker processes, which bench.result's Result (one latency a call) does not hold.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.load import process_cpu_seconds
from bench.result import percentile
from bench.servers import REPO, BenchError, rss_kib

TOKEN = " tok"  # noqa: S105 - a word of the paced reply
TOKENS = 50
PER_CHANNEL = 10  # streams per gRPC connection
STREAMS_PER_PROCESS = 250
CALL_TIMEOUT = 60.0


@dataclass
class Tally:
    """One worker's measurement (the fields `measure` merges)."""

    tokens: int = 0  # provider chunks received inside the window
    messages: int = 0  # messages carrying them
    streams: int = 0  # streams that ended inside the window with every token
    errors: int = 0  # failed streams, warm-up included
    ttft_ms: list[float] = field(default_factory=list)
    gaps_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # this process's CPU over the window
    window_s: float = 0.0

    def error(self, what: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 3:
            self.error_samples.append(what[:300])


class Observer:
    """One stream's messages as they arrive: what falls in the window is counted."""

    __slots__ = ("last", "t0", "tally", "total", "w0", "w1")

    def __init__(self, tally: Tally, w0: float, w1: float) -> None:
        self.tally, self.w0, self.w1 = tally, w0, w1
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.total = 0

    def text(self, text: str) -> None:
        n = text.count(TOKEN)
        if not n:
            return
        now = time.perf_counter()
        self.total += n
        if self.w0 <= now <= self.w1:
            t = self.tally
            t.tokens += n
            t.messages += 1
            if self.last:
                t.gaps_ms.append(round((now - self.last) * 1000, 2))
            else:
                t.ttft_ms.append(round((now - self.t0) * 1000, 2))
        self.last = now


CallFn = Callable[[int, Observer], Awaitable[None]]


async def _grpc(args: argparse.Namespace) -> tuple[CallFn, Callable[[], Awaitable[Any]]]:
    import grpc

    from vibectl._proto import llm_proxy_pb2 as pb
    from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=args.ca_pem)
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel
    address = f"127.0.0.1:{args.port}"
    chans = [
        grpc.aio.secure_channel(address, creds, options=options)
        for _ in range(math.ceil(args.streams / args.per_channel))
    ]
    await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in chans)), 30)
    stubs = [pb_grpc.VibectlLLMProxyStub(c) for c in chans]
    meta = (("authorization", f"Bearer {os.environ['VIBECTLD_BENCH_SECRET']}"),)
    request = pb.ExecuteRequest(user_fragments=["hello"], model_name=args.model)

    async def call(slot: int, obs: Observer) -> None:
        stub = stubs[slot // args.per_channel]
        tail: list[str | None] = []
        async for chunk in stub.StreamExecute(request, metadata=meta, timeout=CALL_TIMEOUT):
            if text := chunk.text_chunk:
                obs.text(text)
            else:
                tail.append(chunk.WhichOneof("chunk_type"))
        if tail[-2:] != ["complete", "final_metrics"]:
            raise BenchError(f"the stream ended with {tail}")

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in chans))

    return call, close


async def _raw(args: argparse.Namespace) -> tuple[CallFn, Callable[[], Awaitable[Any]]]:
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.streams),
        timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT),
    )
    url = f"{args.api_base}/chat/completions"
    body = {"model": "fake", "messages": [{"role": "user", "content": "hello"}], "stream": True}

    async def call(slot: int, obs: Observer) -> None:
        async with session.post(url, json=body) as reply:
            if reply.status != 200:
                raise BenchError(f"HTTP {reply.status}")
            async for line in reply.content:
                if not line.startswith(b"data:") or (data := line[5:].strip()) == b"[DONE]":
                    continue
                choices = json.loads(data).get("choices")
                if choices and (text := (choices[0].get("delta") or {}).get("content")):
                    obs.text(text)

    return call, session.close


async def _work(args: argparse.Namespace) -> Tally:
    call, close = await (_grpc(args) if args.client == "grpc" else _raw(args))
    tally = Tally()
    try:
        print("ready", flush=True)
        go = float(await asyncio.to_thread(sys.stdin.readline))
        offset = time.time() - time.perf_counter()
        start = go - offset
        w0 = start + args.warmup
        w1 = w0 + args.duration
        await asyncio.sleep(max(start - time.perf_counter(), 0))
        loop = asyncio.get_running_loop()
        cpu: list[float] = []
        for at in (w0, w1):
            loop.call_at(
                loop.time() + at - time.perf_counter(), lambda: cpu.append(time.process_time())
            )

        async def slot(i: int) -> None:
            await asyncio.sleep(args.ramp * i / args.streams)
            while time.perf_counter() < w1:
                obs = Observer(tally, w0, w1)
                try:
                    await call(i, obs)
                    if obs.total != TOKENS:
                        raise BenchError(f"{obs.total} of {TOKENS} tokens")
                    if w0 <= time.perf_counter() <= w1:
                        tally.streams += 1
                except Exception as e:  # every failure is counted
                    tally.error(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(0.05)

        tasks = [asyncio.create_task(slot(i)) for i in range(args.streams)]
        await asyncio.sleep(max(w1 - time.perf_counter(), 0))
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tally.window_s = args.duration
        tally.cpu_s = cpu[1] - cpu[0] if len(cpu) == 2 else math.nan
    finally:
        await close()
    return tally


async def _hold(args: argparse.Namespace) -> None:
    """Open the streams and never read them until stdin closes."""
    import grpc

    from vibectl._proto import llm_proxy_pb2 as pb
    from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=args.ca_pem)
    options = [("grpc.use_local_subchannel_pool", 1)]
    # One connection per reader: each is a client of its own.
    chans = [
        grpc.aio.secure_channel(f"127.0.0.1:{args.port}", creds, options=options)
        for _ in range(args.streams)
    ]
    meta = (("authorization", f"Bearer {os.environ['VIBECTLD_BENCH_SECRET']}"),)
    request = pb.ExecuteRequest(user_fragments=["everything"], model_name=args.model)
    calls = [
        pb_grpc.VibectlLLMProxyStub(c).StreamExecute(request, metadata=meta, timeout=300)
        for c in chans
    ]
    await asyncio.gather(*(c.wait_for_connection() for c in calls))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.read)
    for c in calls:
        c.cancel()
    await asyncio.gather(*(ch.close() for ch in chans))


# -- the orchestrator's side --------------------------------------------------------


@dataclass
class Run:
    """One measurement at one number of streams, all workers merged."""

    client: str
    streams: int
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    gap_p99_ms: float
    tokens_per_message: float
    errors: int
    error_samples: list[str]
    daemon_cpu_us_per_token: float | None  # over the window
    daemon_rss_kib: int | None  # median during the window
    worker_cpu_max: float  # the busiest worker's CPU share of one core


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants alive now (from /proc's parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone since the listing
        # After the command name (which may hold spaces and parentheses): state, ppid.
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def tree_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime summed over the process tree; None if the root is unreadable. A
    serving process that exits inside a window takes its CPU with it (and is counted
    once its replacement runs): the window's chunks are then charged less than they cost."""
    if pid is None or process_cpu_seconds(pid) is None:
        return None
    return sum(process_cpu_seconds(p) or 0.0 for p in process_tree(pid))


def tree_rss_kib(pid: int) -> int:
    """RSS summed over the process tree (pages the processes share count once each)."""
    total = 0
    for p in process_tree(pid):
        try:
            total += rss_kib(p)
        except (OSError, BenchError):
            continue  # exited since the listing
    return total


def _argv(client: str, target: dict[str, Any], streams: int, timing: dict[str, float]) -> list[str]:
    argv = [sys.executable, "-m", "bench.streams", "--client", client, "--streams", str(streams)]
    argv += [
        a for k, v in {**target, **timing}.items() for a in (f"--{k.replace('_', '-')}", str(v))
    ]
    return argv


def _wait_ready(procs: list[subprocess.Popen[str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        assert p.stdout is not None
        ready, _, _ = select.select([p.stdout], [], [], max(deadline - time.monotonic(), 0))
        line = p.stdout.readline().strip() if ready else ""
        if line != "ready":
            raise BenchError(f"a stream worker did not start: {line!r} {_stderr(p)}")


def _stderr(p: subprocess.Popen[str]) -> str:
    if p.poll() is None:
        p.kill()
    _, err = p.communicate()
    return err.strip()[-1500:]


def _spawn(argvs: list[list[str]], env: dict[str, str]) -> list[subprocess.Popen[str]]:
    pipe = subprocess.PIPE
    return [
        subprocess.Popen(argv, cwd=REPO, env=env, text=True, stdin=pipe, stdout=pipe, stderr=pipe)
        for argv in argvs
    ]


def measure(
    client: str,
    target: dict[str, Any],
    streams: int,
    env: dict[str, str],
    *,
    pid: int | None,
    warmup: float,
    duration: float,
    ramp: float = 1.0,
) -> Run:
    """`streams` concurrent closed-loop streams from as many workers as they need."""
    n = math.ceil(streams / STREAMS_PER_PROCESS)
    shares = [streams // n + (i < streams % n) for i in range(n)]
    timing = {"warmup": warmup, "duration": duration, "ramp": ramp}
    procs = _spawn([_argv(client, target, k, timing) for k in shares], env)
    try:
        _wait_ready(procs, 60)
        go = time.time() + 0.2
        for p in procs:
            assert p.stdin is not None
            p.stdin.write(f"{go}\n")
            p.stdin.flush()
        time.sleep(max(go + warmup - time.time(), 0))
        cpu0, rss = tree_cpu_seconds(pid), []
        end = go + warmup + duration
        while (left := end - time.time()) > 0:
            time.sleep(min(0.25, left))
            if pid is not None and time.time() < end - 0.1:
                rss.append(tree_rss_kib(pid))
        cpu1 = tree_cpu_seconds(pid)
        tallies = []
        for p in procs:
            out, err = p.communicate(timeout=warmup + duration + 60)
            if p.returncode != 0 or not out.strip():
                raise BenchError(f"a stream worker failed (exit {p.returncode}): {err[-1500:]}")
            tallies.append(Tally(**json.loads(out.strip().splitlines()[-1])))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return _merge(client, streams, tallies, cpu0, cpu1, rss, duration)


def _merge(
    client: str,
    streams: int,
    tallies: list[Tally],
    cpu0: float | None,
    cpu1: float | None,
    rss: list[int],
    duration: float,
) -> Run:
    tokens = sum(t.tokens for t in tallies)
    ttft = [x for t in tallies for x in t.ttft_ms]
    gaps = [x for t in tallies for x in t.gaps_ms]
    cpu = (cpu1 - cpu0) / tokens * 1e6 if cpu0 is not None and cpu1 is not None and tokens else None
    return Run(
        client,
        streams,
        tokens_per_s=tokens / duration,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        gap_p99_ms=percentile(gaps, 99),
        tokens_per_message=tokens / max(sum(t.messages for t in tallies), 1),
        errors=sum(t.errors for t in tallies),
        error_samples=[s for t in tallies for s in t.error_samples][:3],
        daemon_cpu_us_per_token=cpu,
        # The upper median: one of the readings, so a whole number of KiB.
        daemon_rss_kib=statistics.median_high(rss) if rss else None,
        worker_cpu_max=max(t.cpu_s / t.window_s for t in tallies),
    )


def never_read(
    target: dict[str, Any], readers: int, env: dict[str, str], pid: int, seconds: float
) -> list[tuple[float, int]]:
    """The daemon's RSS (KiB) before, then over `seconds` after `readers` streams opened
    that are never read: [(-1, before), (0, once open), (0.5, ...), ...]."""
    argv = [*_argv("grpc", target, readers, {}), "--never-read"]
    samples = [(-1.0, tree_rss_kib(pid))]
    (proc,) = _spawn([argv], env)
    try:
        _wait_ready([proc], 60)
        started = time.monotonic()
        samples.append((0.0, tree_rss_kib(pid)))
        while (t := time.monotonic() - started) < seconds:
            time.sleep(0.5)
            samples.append((round(t + 0.5, 1), tree_rss_kib(pid)))
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__)
    p.add_argument("--client", choices=("grpc", "raw"), required=True)
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--ca", default="")
    p.add_argument("--model", default="fake-gpt")
    p.add_argument("--api-base", default="")
    p.add_argument("--per-channel", type=int, default=PER_CHANNEL)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--ramp", type=float, default=1.0)
    p.add_argument("--never-read", action="store_true")
    args = p.parse_args(argv)
    args.ca_pem = Path(args.ca).read_bytes() if args.ca else b""
    if args.never_read:
        asyncio.run(_hold(args))
        return
    tally = asyncio.run(_work(args))
    print(json.dumps(asdict(tally)), flush=True)


if __name__ == "__main__":
    main()
