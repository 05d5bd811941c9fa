"""Overhead vs the floor: vibectld (echo model) against a bare grpc.aio server of the
same protocol that answers with a canned reply, same TLS certificate, same options."""

from __future__ import annotations

from bench import common as c
from bench.common import Context, Section
from bench.result import Result
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
# server.workers: one serving process, then `auto` on this 2-core machine (2). A load
# generator's connections are spread over the workers by the kernel (SO_REUSEPORT hashes
# each connection), so with more than one worker both servers get CHANNELS_PER_WORKER
# connections per worker; the floor, one process, gets as many.
WORKERS, QUICK_WORKERS, CHANNELS_PER_WORKER = (1, 2), (2,), 4

INTRO = """\
vibectld (TLS, secret auth on every call, the `echo` model, JSON logs at level info to a
file, no limits) against the floor: a bare grpc.aio server of the same protocol with a
canned reply of the same size, vibectld's TLS certificate and server options
(`bench/floor_server.py`). Closed-loop load from a separate process (`bench/load.py`),
one gRPC channel per server. With 16 and 64 callers the callers move between the two
servers every second (`--strategy sliced`); at 1 caller single calls alternate between
them (`--strategy paired`; req/s there is 1 / mean latency). Either way both servers are
measured over the same stretch of time, so the machine's drift cancels out. "first
chunk" is the time to the first text chunk of a stream; CPU is the server process's, per
request: with more than one worker, only the main process's ("-": the load's CPU
measure reads one process). Each table is one `server.workers` setting."""


def run(ctx: Context) -> Section:
    s = ctx.settings
    section = Section("overhead", "Overhead vs the floor", INTRO)
    for workers in QUICK_WORKERS if s.quick else WORKERS:
        report(section, _measure(ctx, section, workers), workers)
    return section


def _measure(
    ctx: Context, section: Section, workers: int
) -> dict[tuple[str, int], dict[str, list[Result]]]:
    """Every mode and number of callers, vibectld on `workers` processes against the floor."""
    s = ctx.settings
    daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name=f"overhead-{workers}",
                      workers=workers)  # fmt: skip
    daemon.start()
    floor = Floor(ctx.procs)
    floor.start(*daemon.chain_for_floor())
    ctx.log(f"  vibectld (workers {workers}) pid {daemon.pid} port {daemon.port}; "
            f"floor pid {floor.pid} port {floor.port}")  # fmt: skip
    channels = CHANNELS_PER_WORKER * workers if workers > 1 else None
    targets = {
        "floor": c.target("floor", port=floor.port, ca=daemon.ca_path, pid=floor.pid,
                          channels=channels),
        "vibectld": c.target("vibectld", port=daemon.port, ca=daemon.ca_path,
                             pid=daemon.pid if workers == 1 else None, channels=channels),
    }  # fmt: skip
    env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)
    configs = QUICK_CONFIGS if s.quick else tuple((m, n) for m in MODES for n in CALLERS)
    cells: dict[tuple[str, int], dict[str, list[Result]]] = {}
    try:
        for mode, callers in configs:
            got = cells[(mode, callers)] = {}
            for rep in range(s.repeats):
                order = c.in_turn(rep, ["floor", "vibectld"])
                args = c.head_to_head(callers, s.duration)
                args += [*targets[order[0]], *targets[order[1]]]
                args += ["--mode", mode, "--warmup", str(s.warmup)]
                tag = f"workers {workers} {mode:6} x{callers:<3} rep {rep + 1}"
                c.collect(ctx, section, got, c.measure_load(args, env=env), tag)
    finally:
        if floor.proc is not None:
            ctx.procs.stop(floor.proc)
        daemon.stop()
    return cells


def report(
    section: Section, cells: dict[tuple[str, int], dict[str, list[Result]]], workers: int
) -> None:
    """One table and its graded targets for one `server.workers` setting."""
    on = f", {workers} workers" if workers > 1 else ", 1 worker"
    header = [
        "mode", "callers", "floor req/s", "vibectld req/s", "ratio",
        "floor p50 / p99 ms", "vibectld p50 / p99 ms", "p50 delta ms",
        "first chunk p50 ms floor / vibectld", "server CPU us/req floor / vibectld", "errors",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for (mode, callers), got in cells.items():
        f, v = got["floor"], got["vibectld"]
        ratio, delta = c.paired_ratio(f, v, "rps"), c.paired_delta(f, v, "p50_ms")
        rps_f, rps_v = c.median_of(f, "rps"), c.median_of(v, "rps")
        p50_f, p50_v = c.median_of(f, "p50_ms"), c.median_of(v, "p50_ms")
        cpu = "server_cpu_us_per_req"
        row = [
            LABEL[mode], str(callers), f"{rps_f:.0f}", f"{rps_v:.0f}", c.pct(ratio),
            _pair(p50_f, c.median_of(f, "p99_ms")), _pair(p50_v, c.median_of(v, "p99_ms")),
            f"{delta:+.3f}",
            _pair(c.median_of(f, "ttfc_p50_ms"), c.median_of(v, "ttfc_p50_ms"))
            if mode == "stream" else "-",
            _pair(c.median_of(f, cpu), c.median_of(v, cpu), ".0f"),
            f"{c.total(f, 'errors')} / {c.total(v, 'errors')}",
        ]  # fmt: skip
        rows.append(row)
        label = f"{LABEL[mode]}, {callers} caller{'s' if callers > 1 else ''}"
        if callers == THROUGHPUT_CALLERS:
            vs = c.Versus(f"throughput ({label}){on}", "Overhead",
                          f"{LABEL[mode]} req/s at {callers} callers, vs the floor{on}",
                          "vibectld", "the floor's")  # fmt: skip
            c.grade_share(section, vs, rps_v, rps_f, ratio, MIN_RPS_RATIO)
        if callers == 1:
            vs = c.Versus(f"latency ({label}){on}", "Overhead",
                          f"{LABEL[mode]} p50 at 1 caller, over the floor{on}",
                          "vibectld p50", "the floor")  # fmt: skip
            c.grade_ms_over(section, vs, p50_v, p50_f, delta, MAX_P50_DELTA_MS, ".3f")
        if callers == 1 and mode == "stream":
            _first_chunk(section, f, v, on)
    section.tables.append(f"server.workers: {workers}\n\n" + c.md_table(header, rows))


def _pair(a: float, b: float, spec: str = ".3f") -> str:
    return f"{c.fmt(a, spec)} / {c.fmt(b, spec)}"


def _first_chunk(section: Section, f: list[Result], v: list[Result], on: str) -> None:
    vt, ft = c.median_of(v, "ttfc_p50_ms"), c.median_of(f, "ttfc_p50_ms")
    delta = c.paired_delta(f, v, "ttfc_p50_ms")
    vs = c.Versus(f"time to first chunk (streaming, 1 caller){on}", "Overhead",
                  f"streaming time to first chunk at 1 caller, over the floor{on}",
                  "vibectld first chunk p50", "the floor")  # fmt: skip
    c.grade_ms_over(section, vs, vt, ft, delta, MAX_TTFB_DELTA_MS, ".3f")
