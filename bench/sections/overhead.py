"""Overhead vs the floor: vibectld (echo model) against a bare grpc.aio server of the
same protocol that answers with a canned reply, same TLS certificate, same options."""

from __future__ import annotations

import math

from bench.common import (
    Context,
    Result,
    Section,
    SummaryRow,
    check_errors,
    fmt,
    md_table,
    measure_load,
    median,
    paired_delta,
    paired_ratio,
    pct,
    result_line,
    total,
)
from bench.servers import Floor, Vibectld, clean_env

MODES = ("unary", "stream")
CALLERS = (1, 16, 64)
# --quick: what the targets need.
QUICK_CONFIGS = (("unary", 1), ("unary", 16), ("stream", 1), ("stream", 16))
# The targets.
MIN_RPS_RATIO = 0.60  # of the floor's req/s at THROUGHPUT_CALLERS callers
THROUGHPUT_CALLERS = 16
MAX_P50_DELTA_MS = 0.35  # over the floor's p50 at 1 caller
MAX_TTFB_DELTA_MS = 0.5  # streaming: first chunk p50 over the floor's, at 1 caller
LABEL = {"unary": "unary", "stream": "streaming"}

INTRO = """\
vibectld (TLS, secret auth on every call, the `echo` model, JSON logs at level info to a
file, no limits) against the floor: a bare grpc.aio server of the same protocol with a
canned reply of the same size, vibectld's TLS certificate and server options
(`bench/floor_server.py`). Closed-loop load from a separate process, one gRPC channel
per server. With 16 and 64 callers the callers move between the two servers every
second (`bench/sliced.py`); at 1 caller single calls alternate between them
(`bench/paired.py`; req/s there is 1 / mean latency). Either way both servers are
measured over the same stretch of time, so the machine's drift cancels out. "first
chunk" is the time to the first text chunk of a stream; CPU is the server process's, per
request."""


def run(ctx: Context) -> Section:
    s = ctx.settings
    section = Section("overhead", "Overhead vs the floor", INTRO)
    daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="overhead")
    daemon.start()
    floor = Floor(ctx.procs)
    floor.start(*daemon.chain_for_floor())
    ctx.log(
        f"  vibectld pid {daemon.pid} port {daemon.port}; floor pid {floor.pid} port {floor.port}"
    )
    servers = {"floor": (floor.port, floor.pid), "vibectld": (daemon.port, daemon.pid)}
    env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)
    cells: dict[tuple[str, int], dict[str, list[Result]]] = {}
    try:
        configs = QUICK_CONFIGS if s.quick else tuple((m, c) for m in MODES for c in CALLERS)
        for mode, callers in configs:
            got: dict[str, list[Result]] = {"floor": [], "vibectld": []}
            for rep in range(s.repeats):
                if callers == 1:
                    # One process alternating calls between the two: see bench/paired.py.
                    args = [
                        "--vibectld-port", str(daemon.port), "--vibectld-pid", str(daemon.pid),
                        "--floor-port", str(floor.port), "--floor-pid", str(floor.pid),
                        "--ca", str(daemon.ca_path), "--mode", mode,
                        "--duration", str(1.5 * s.duration), "--warmup", str(s.warmup),
                    ]  # fmt: skip
                    pair = measure_load("bench.paired", args, env=env)
                    for name in ("floor", "vibectld"):
                        got[name].append(pair[name])
                        tag = f"  {mode:6} x1   rep {rep + 1} {name:8} (paired)"
                        ctx.log(result_line(tag, pair[name]))
                        check_errors(section, f"{name} {mode} x1", pair[name])
                    continue
                # One process whose callers move between the two servers every second.
                order = ["floor", "vibectld"] if rep % 2 == 0 else ["vibectld", "floor"]
                targets: list[str] = []
                for name in order:
                    port, pid = servers[name]
                    spec = f"{name}:{port}:{daemon.ca_path}:VIBECTLD_BENCH_SECRET:{pid}"
                    targets += ["--target", spec]
                args = [
                    *targets, "--mode", mode, "--callers", str(callers), "--slice", "1",
                    "--duration", str(2 * s.duration), "--warmup", str(s.warmup),
                ]  # fmt: skip
                pair = measure_load("bench.sliced", args, env=env)
                for name in order:
                    got[name].append(pair[name])
                    tag = f"  {mode:6} x{callers:<3} rep {rep + 1} {name:8} (sliced)"
                    ctx.log(result_line(tag, pair[name]))
                    check_errors(section, f"{name} {mode} x{callers}", pair[name])
            cells[(mode, callers)] = got
    finally:
        if floor.proc is not None:
            ctx.procs.stop(floor.proc)
        daemon.stop()
    _report(section, cells)
    return section


def _report(section: Section, cells: dict[tuple[str, int], dict[str, list[Result]]]) -> None:
    header = [
        "mode", "callers", "floor req/s", "vibectld req/s", "ratio",
        "floor p50 / p99 ms", "vibectld p50 / p99 ms", "p50 delta ms",
        "first chunk p50 ms floor / vibectld", "server CPU us/req floor / vibectld", "errors",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for (mode, callers), got in cells.items():
        f, v = got["floor"], got["vibectld"]
        ratio = paired_ratio(f, v, "rps")
        first = "-"
        if mode == "stream":
            first = (
                f"{fmt(median(f, 'ttfc_p50_ms'), '.3f')} / {fmt(median(v, 'ttfc_p50_ms'), '.3f')}"
            )
        rows.append(
            [
                LABEL[mode],
                str(callers),
                f"{median(f, 'rps'):.0f}",
                f"{median(v, 'rps'):.0f}",
                pct(ratio),
                f"{median(f, 'p50_ms'):.3f} / {median(f, 'p99_ms'):.3f}",
                f"{median(v, 'p50_ms'):.3f} / {median(v, 'p99_ms'):.3f}",
                f"{paired_delta(f, v, 'p50_ms'):+.3f}",
                first,
                f"{fmt(median(f, 'server_cpu_us_per_req'), '.0f')} / "
                f"{fmt(median(v, 'server_cpu_us_per_req'), '.0f')}",
                f"{total(f, 'errors')} / {total(v, 'errors')}",
            ]
        )
    section.tables.append(md_table(header, rows))

    for (mode, callers), got in cells.items():
        f, v = got["floor"], got["vibectld"]
        label = f"{LABEL[mode]}, {callers} caller{'s' if callers > 1 else ''}"
        if callers == THROUGHPUT_CALLERS:
            ratio = paired_ratio(f, v, "rps")
            passed = ratio >= MIN_RPS_RATIO
            section.check(
                f"throughput ({label})",
                passed,
                f"vibectld {median(v, 'rps'):.0f} req/s = {ratio:.0%} of the floor's "
                f"{median(f, 'rps'):.0f} (target >= {MIN_RPS_RATIO:.0%})",
            )
            section.summary.append(
                SummaryRow(
                    "Overhead",
                    f"{LABEL[mode]} req/s at {callers} callers, vs the floor",
                    f"{ratio:.0%} ({median(v, 'rps'):.0f} vs {median(f, 'rps'):.0f})",
                    f">= {MIN_RPS_RATIO:.0%}",
                    "PASS" if passed else "FAIL",
                )
            )
        if callers == 1:
            delta = paired_delta(f, v, "p50_ms")
            passed = delta <= MAX_P50_DELTA_MS
            section.check(
                f"latency ({label})",
                passed,
                f"vibectld p50 {median(v, 'p50_ms'):.3f} ms = floor {median(f, 'p50_ms'):.3f} "
                f"ms {delta:+.3f} ms (target <= +{MAX_P50_DELTA_MS} ms)",
            )
            section.summary.append(
                SummaryRow(
                    "Overhead",
                    f"{LABEL[mode]} p50 at 1 caller, over the floor",
                    f"{delta:+.3f} ms ({median(v, 'p50_ms'):.3f} vs {median(f, 'p50_ms'):.3f})",
                    f"<= +{MAX_P50_DELTA_MS} ms",
                    "PASS" if passed else "FAIL",
                )
            )
            if mode == "stream":
                vt, ft = median(v, "ttfc_p50_ms"), median(f, "ttfc_p50_ms")
                delta = paired_delta(f, v, "ttfc_p50_ms")
                passed = not math.isnan(delta) and delta <= MAX_TTFB_DELTA_MS
                section.check(
                    "time to first chunk (streaming, 1 caller)",
                    passed,
                    f"vibectld first chunk p50 {vt:.3f} ms = floor {ft:.3f} ms {delta:+.3f} ms "
                    f"(target <= +{MAX_TTFB_DELTA_MS} ms)",
                )
                section.summary.append(
                    SummaryRow(
                        "Overhead",
                        "streaming time to first chunk at 1 caller, over the floor",
                        f"{delta:+.3f} ms ({vt:.3f} vs {ft:.3f})",
                        f"<= +{MAX_TTFB_DELTA_MS} ms",
                        "PASS" if passed else "FAIL",
                    )
                )
