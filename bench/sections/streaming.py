"""Token streams at a provider's pace: many concurrent StreamExecute callers against a raw
SSE client on the same paced provider, the daemon's CPU per relayed chunk and memory per
open stream, and the memory held for clients that never read."""

from __future__ import annotations

import functools
from typing import Any

from bench import common as c
from bench import streams
from bench.common import Context, Section
from bench.servers import FakeProvider, Floor, Vibectld, clean_env
from bench.streams import Run, tree_rss_kib

LEVELS = (100, 400, 1000)
QUICK_LEVELS = (50,)
# server.workers: one serving process, then one per core of this 2-core machine; the
# README's note on how capacity grows with cores reads the two tables side by side.
WORKERS, QUICK_WORKERS = (1, 2), (2,)
MODEL_ID, BULK_ID = "fake-gpt", "bulk"
# Slow readers: each asks for 2,000 chunks of 16 KiB (32 MiB) and reads none of it.
READERS, QUICK_READERS, HOLD_S, QUICK_HOLD_S = 100, 10, 10.0, 2.0
BULK = ("x" * 16384, 2000)
MAX_CPU_US, MIN_RATIO_400, MAX_TTFT_OVER_MS, MIN_RATIO_1000, MAX_RSS_KB = 35, 0.95, 50, 0.80, 50
AREA = "Streaming (paced)"

INTRO = f"""\
A paced fake provider (`bench/fake_paced.py`: one event loop, {streams.TOKENS} tokens per
reply, the first after 20 ms and then one every 20 ms, SSE with chunked encoding) is
streamed from by N concurrent closed-loop callers: through vibectld (`StreamExecute`,
grpc.aio, one TLS connection per {streams.PER_CHANNEL} streams) and, in the same run,
alternating with it, by a raw aiohttp SSE client straight from the provider. The "gRPC
floor" is a bare grpc.aio server (`bench/floor_server.py --paced`, one process, vibectld's
certificate) that sends the same {streams.TOKENS} tokens at the same pace, each as its own
message, to the same load, with no provider to read: what Python's gRPC costs a relay
that sends every token as it comes. Each side
runs in load-generator processes of at most {streams.STREAMS_PER_PROCESS} streams
(`bench/streams.py`; "busiest load gen" is the share of a core the busiest one used).
"chunks" are the provider's chunks (tokens); vibectld may carry several in one message
when more than one is waiting ("chunks/msg"). "gap" is the time between two messages of
a stream. vibectld's CPU per chunk is its utime+stime over the window / chunks relayed;
RSS per stream is (RSS during the run - RSS idle) / N; both are summed over the main
process and its serving processes. Each table is one `server.workers` setting, with its
own raw runs. Slow readers (on {WORKERS[-1]} workers): {READERS} clients, one connection
each, open a stream of a 32 MiB reply and never read it."""


def run(ctx: Context) -> Section:
    s = ctx.settings
    section = Section("streaming", "Streaming at scale", INTRO)
    paced = FakeProvider(ctx.procs, 20, chunk_delay_ms=20, module="bench.fake_paced",
                         stream=(streams.TOKEN, streams.TOKENS))  # fmt: skip
    bulk = FakeProvider(ctx.procs, 0, stream=BULK)
    paced.start()
    bulk.start()
    endpoints = [{"model_id": m, "model_name": "fake", "api_base": f.api_base}
                 for m, f in ((MODEL_ID, paced), (BULK_ID, bulk))]  # fmt: skip
    models = {"default": "echo", "openai_compatible": endpoints}
    workers = QUICK_WORKERS if s.quick else WORKERS
    for n_workers in workers:
        daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name=f"streaming-{n_workers}",
                          models=models, workers=n_workers)  # fmt: skip
        daemon.start()
        floor = Floor(ctx.procs)
        floor.start(*daemon.chain_for_floor(), 30.0, "--paced", str(streams.TOKENS),
                    "--interval-ms", "20", "--text", streams.TOKEN)  # fmt: skip
        try:
            got, idle = _levels(ctx, section, daemon, floor, paced.api_base, n_workers)
        finally:
            daemon.stop()
            if floor.proc is not None:
                ctx.procs.stop(floor.proc)
        report(section, got, idle, n_workers)
    # Slow readers on a daemon of their own: what the runs above left allocated is not theirs.
    daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="readers", models=models,
                      workers=workers[-1])  # fmt: skip
    daemon.start()
    env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)
    target = {"port": daemon.port, "ca": daemon.ca_path, "model": BULK_ID}
    readers, hold = (QUICK_READERS, QUICK_HOLD_S) if s.quick else (READERS, HOLD_S)
    held = streams.never_read(target, readers, env, daemon.pid, hold)
    ctx.log(f"  slow readers: RSS KiB over time {held}")
    _readers(section, held, readers)
    return section


def _levels(
    ctx: Context, section: Section, daemon: Vibectld, floor: Floor, api_base: str, n_workers: int
) -> tuple[dict[tuple[int, str], list[Run]], int]:
    """Every level, raw, through `daemon` and from the floor in turn; the daemon's idle RSS."""
    s = ctx.settings
    env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)
    grpc_t: dict[str, Any] = {"port": daemon.port, "ca": daemon.ca_path, "model": MODEL_ID}
    floor_t = {**grpc_t, "port": floor.port}
    targets: dict[str, dict[str, Any]] = {"raw": {"api_base": api_base}, "grpc": grpc_t,
                                          "floor": floor_t}  # fmt: skip
    pids = {"raw": None, "grpc": daemon.pid, "floor": floor.pid}
    warmup, duration = (1.2, 1.5) if s.quick else (max(s.warmup, 2.0), s.duration)
    levels = QUICK_LEVELS if s.quick else LEVELS
    # Enough streams that every worker (the kernel spreads connections) has served some.
    streams.measure("grpc", grpc_t, 10 * n_workers * levels[0] // 50, env, pid=None,
                    warmup=1.0, duration=0.5)  # fmt: skip
    idle = tree_rss_kib(daemon.pid)
    got: dict[tuple[int, str], list[Run]] = {}
    for n in levels:
        for rep in range(s.repeats):
            order = ("raw", "grpc", "floor")
            for client in order if rep % 2 == 0 else order[::-1]:
                kind = "raw" if client == "raw" else "grpc"
                r = streams.measure(kind, targets[client], n, env, pid=pids[client],
                                    warmup=warmup, duration=duration)  # fmt: skip
                got.setdefault((n, client), []).append(r)
                ctx.log(f"  workers {n_workers} {n:5} streams rep {rep + 1} "
                        f"{_name(client):8} {_line(r)}")  # fmt: skip
                if r.errors:
                    where = f"workers {n_workers}, {n} streams {client}"
                    section.failures.append(f"{where}: {r.errors} errors, e.g. {r.error_samples}")
    return got, idle


def _name(client: str) -> str:
    return {"raw": "raw", "grpc": "vibectld", "floor": "gRPC floor"}[client]


def _line(r: Run) -> str:
    cpu = c.fmt(r.daemon_cpu_us_per_token, ".1f")
    return (f"{r.tokens_per_s:8.0f} chunks/s  TTFT p50 {r.ttft_p50_ms:.1f} p99 {r.ttft_p99_ms:.1f}"
            f" ms  gap p99 {r.gap_p99_ms:.1f} ms  errors {r.errors}  CPU/chunk {cpu} us  "
            f"load gen {r.worker_cpu_max:.0%}")  # fmt: skip


def report(
    section: Section, got: dict[tuple[int, str], list[Run]], idle: int, n_workers: int
) -> None:
    """One table and its graded targets for one `server.workers` setting."""
    header = ["streams", "path", "chunks/s", "vs raw", "TTFT p50 ms", "TTFT p99 ms",
              "gap p99 ms", "chunks/msg", "errors", "vibectld CPU us/chunk",
              "RSS/stream kB", "busiest load gen"]  # fmt: skip
    rows: list[list[str]] = []
    per: dict[int, float] = {}
    for (n, client), rs in got.items():
        m = functools.partial(c.median_of, rs)
        ratio = c.paired_ratio(got[(n, "raw")], rs, "tokens_per_s")
        if client == "grpc":
            per[n] = (c.median_of(rs, "daemon_rss_kib") - idle) * 1.024 / n
        rows.append([str(n), _name(client), f"{m('tokens_per_s'):.0f}", c.pct(ratio),
                     f"{m('ttft_p50_ms'):.1f}", f"{m('ttft_p99_ms'):.1f}",
                     f"{m('gap_p99_ms'):.1f}", f"{m('tokens_per_message'):.2f}",
                     str(c.total(rs, "errors")), c.fmt(m("daemon_cpu_us_per_token"), ".1f"),
                     c.fmt(per.get(n), ".1f") if client == "grpc" else "-",
                     f"{max(r.worker_cpu_max for r in rs):.0%}"])  # fmt: skip
    section.tables.append(f"server.workers: {n_workers}\n\n" + c.md_table(header, rows))
    levels = sorted({n for n, _ in got})
    mid, top = (400, 1000) if 1000 in levels else (levels[-1], levels[-1])
    _grade(section, got, mid, top, per[top], n_workers)
    if top > mid:
        # What one more open stream costs, without the allocator's and caches' one-time
        # growth that the figure above idle charges to the streams too.
        rss_at = {n: c.median_of(got[(n, "grpc")], "daemon_rss_kib") for n in (mid, top)}
        slope = (rss_at[top] - rss_at[mid]) * 1.024 / (top - mid)
        what = f"RSS per added open stream, {mid} -> {top} streams, {n_workers} w."
        section.check(what, None, f"{slope:.1f} kB")
        section.row(AREA, what, f"{slope:.1f} kB")
    for n in sorted({mid, top}):
        ratio = c.paired_ratio(got[(n, "floor")], got[(n, "grpc")], "tokens_per_s")
        what = f"chunks/s at {n} streams, vibectld ({n_workers} w.) vs the gRPC floor (1 process)"
        section.check(what, None, c.pct(ratio))
        section.row(AREA, what, c.pct(ratio))


def _readers(section: Section, held: list[tuple[float, int]], readers: int) -> None:
    (_, before), (_, opened), (last_s, last) = held[0], held[1], held[-1]
    growth, late = (last - before) / 1024, (last - held[len(held) // 2][1]) / 1024
    result = (f"{before / 1024:.0f} -> {last / 1024:.0f} MiB ({growth:+.1f} MiB, "
              f"{growth * 1024 / readers:.0f} KiB per reader; {late:+.1f} MiB in the last "
              f"{last_s / 2:g} s)")  # fmt: skip
    section.check(f"memory with {readers} clients that never read (32 MiB replies)", None,
                  f"RSS {result}; {opened / 1024:.0f} MiB once open")  # fmt: skip
    section.row(AREA, f"RSS with {readers} streams never read (32 MiB replies)", result)


def _grade(
    section: Section,
    got: dict[tuple[int, str], list[Run]],
    mid: int,
    top: int,
    rss: float,
    n_workers: int,
) -> None:
    def m(n: int, client: str, key: str) -> float:
        return c.median_of(got[(n, client)], key)

    def vs(n: int, key: str, spec: str) -> str:
        return f"({m(n, 'grpc', key):{spec}} vs {m(n, 'raw', key):{spec}})"

    cpu = m(mid, "grpc", "daemon_cpu_us_per_token")
    ratio = c.paired_ratio(got[(mid, "raw")], got[(mid, "grpc")], "tokens_per_s")
    over = c.paired_delta(got[(mid, "raw")], got[(mid, "grpc")], "ttft_p99_ms")
    top_ratio = c.paired_ratio(got[(top, "raw")], got[(top, "grpc")], "tokens_per_s")
    errors = c.total(got[(top, "grpc")], "errors")
    checks = [
        (f"vibectld CPU per relayed chunk at {mid} streams", cpu <= MAX_CPU_US,
         f"{cpu:.1f} us", f"<= {MAX_CPU_US} us"),
        (f"chunks/s at {mid} streams, vs raw", ratio >= MIN_RATIO_400,
         f"{ratio:.0%} {vs(mid, 'tokens_per_s', '.0f')}",
         f">= {MIN_RATIO_400:.0%}"),
        (f"TTFT p99 at {mid} streams, over raw", over <= MAX_TTFT_OVER_MS,
         f"{over:+.1f} ms {vs(mid, 'ttft_p99_ms', '.1f')}",
         f"<= +{MAX_TTFT_OVER_MS} ms"),
        (f"errors at {top} streams", errors == 0, str(errors), "0"),
        (f"chunks/s at {top} streams, vs raw", top_ratio >= MIN_RATIO_1000,
         f"{top_ratio:.0%} {vs(top, 'tokens_per_s', '.0f')}",
         f">= {MIN_RATIO_1000:.0%}"),
        (f"RSS per open stream at {top} streams", rss <= MAX_RSS_KB, f"{rss:.1f} kB",
         f"<= {MAX_RSS_KB} kB"),
    ]  # fmt: skip
    for what, ok, result, goal in checks:
        name = f"{what}, {n_workers} worker{'s' if n_workers > 1 else ''}"
        section.graded(name, ok, f"{result} (target {goal})", (AREA, name, result, goal))
