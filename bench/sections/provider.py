"""The real provider path: a fake OpenAI-compatible endpoint with a fixed 20 ms latency,
called directly (raw HTTP with aiohttp and with httpx), through the llm library in-process (as
vibectld registers endpoints, and llm's stock way), and through vibectld."""

from __future__ import annotations

import tempfile

from bench import common as c
from bench.clients import MODEL_ID, MODEL_NAME
from bench.common import Context, Section
from bench.result import Result
from bench.servers import FakeProvider, Vibectld, clean_env

LATENCY_MS = 20.0
# (path, what it is): the targets of bench.load (see bench/clients.py).
PATHS = (
    ("raw", "raw HTTP: aiohttp ClientSession, kept-alive pool (what vibectld uses)"),
    ("httpx", "raw HTTP: httpx AsyncClient, kept-alive pool (what the openai package uses)"),
    ("llm-pooled", "llm in-process, vibectld's model for the endpoint (AiohttpAsyncChat)"),
    ("llm-stock", "llm in-process, stock AsyncChat with api_base"),
    ("vibectld", "through vibectld (gRPC, TLS, auth) to the same endpoint"),
)
CONFIGS = (("unary", 1), ("unary", 16), ("stream", 1))
# --quick: only the paths the targets compare.
QUICK_PATHS = ("raw", "llm-pooled", "vibectld")
# The targets (vibectld against the raw client).
MAX_P50_OVER_RAW_MS = 2.0
MIN_RPS_RATIO = 0.80
MAX_TTFT_OVER_RAW_MS = 2.0
AREA = "Provider (20 ms fake)"
ROW_MEASURES = {
    "unary": "p50 at 1 caller, over a raw HTTP client",
    "stream": "streaming time to first token at 1 caller, over raw",
}

INTRO = f"""\
A fake OpenAI-compatible endpoint (`bench/fake_openai.py` in a separate process,
TCP_NODELAY like a real server) answers every chat completion after a fixed
{LATENCY_MS:g} ms, as one JSON document or as an SSE stream. Each path is driven
closed-loop from its own load-generator process (`bench/load.py`, its clients in
`bench/clients.py`); at 1 caller, raw and vibectld are measured by one process that
alternates single calls between them (`--strategy paired`; req/s there is 1 / mean
latency), so that their difference is not the machine's drift. vibectld serves the
endpoint from
`models.openai_compatible: [{{model_id: {MODEL_ID}, model_name: {MODEL_NAME}, api_base: ...}}]`.
"first text" is the time to the first non-empty text (TTFT). "client CPU" is the load
generator's CPU per request: for the in-process llm paths that is the library's own cost;
"vibectld CPU" is the daemon's."""


def _settings(ctx: Context) -> tuple[float, float]:
    s = ctx.settings
    # Calls take >= 20 ms, so a shorter window than the overhead's holds plenty of them.
    return (min(s.duration, 3.0), min(s.warmup, 1.0))


def run(ctx: Context) -> Section:
    s = ctx.settings
    section = Section("provider", "The real provider path", INTRO)
    fake = FakeProvider(ctx.procs, LATENCY_MS)
    fake.start()
    endpoint = {"model_id": MODEL_ID, "model_name": MODEL_NAME, "api_base": fake.api_base}
    models = {"default": "echo", "openai_compatible": [endpoint]}
    daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="provider", models=models)
    daemon.start()
    # The daemon's first provider call creates the pooled client: not part of any measurement.
    c.warm_up(ctx, daemon.port, daemon.ca_path, daemon.secret, model=MODEL_ID)
    ctx.log(f"  fake provider pid {fake.pid} at {fake.api_base}; vibectld pid {daemon.pid}")
    llm_home = tempfile.mkdtemp(prefix="llm-", dir=ctx.workdir)
    env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret, LLM_USER_PATH=llm_home)
    duration, warmup = _settings(ctx)
    paths = [p for p, _ in PATHS if not s.quick or p in QUICK_PATHS]
    targets = {p: c.target(p, client=p, api_base=fake.api_base) for p in paths}
    targets["vibectld"] = c.target(
        "vibectld", port=daemon.port, ca=daemon.ca_path, model=MODEL_ID, pid=daemon.pid
    )
    cells: dict[tuple[str, int], dict[str, list[Result]]] = {}
    try:
        for mode, callers in CONFIGS:
            got = cells[(mode, callers)] = {}
            # At 1 caller raw and vibectld are measured by one process alternating calls.
            units = [["raw", "vibectld"]] if callers == 1 else []
            units += [[p] for p in paths if callers > 1 or p not in ("raw", "vibectld")]
            for rep in range(s.repeats):
                # Rotate the order so no path always runs first (or last).
                for unit in units[rep % len(units) :] + units[: rep % len(units)]:
                    args = ["--mode", mode, "--warmup", str(warmup)]
                    if len(unit) == 2:
                        args += ["--strategy", "paired", "--duration", str(2 * duration)]
                    else:
                        args += ["--callers", str(callers), "--duration", str(duration)]
                    args += [a for p in unit for a in targets[p]]
                    tag = f"{mode:6} x{callers:<3} rep {rep + 1}"
                    c.collect(ctx, section, got, c.measure_load(args, env=env), tag)
    finally:
        daemon.stop()
        if fake.proc is not None:
            ctx.procs.stop(fake.proc)
    report(section, cells)
    return section


def report(section: Section, cells: dict[tuple[str, int], dict[str, list[Result]]]) -> None:
    header = [
        "path", "mode", "callers", "req/s", "vs raw", "p50 ms", "p99 ms", "p50 over raw ms",
        "first text p50 ms", "client CPU us/req", "vibectld CPU us/req", "errors",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for (mode, callers), got in cells.items():
        for path in (p for p, _ in PATHS if p in got):
            rows.append(_row(path, mode, callers, got[path], got["raw"]))
    section.tables.append(c.md_table(header, rows))
    section.tables.append(c.md_table(["path", "what it is"], [[p, w] for p, w in PATHS]))
    _over_raw(section, cells[("unary", 1)], "unary")
    _throughput(section, cells[("unary", 16)])
    _over_raw(section, cells[("stream", 1)], "stream")


def _row(path: str, mode: str, callers: int, rs: list[Result], raw: list[Result]) -> list[str]:
    def m(key: str) -> float:
        return c.median_of(rs, key)

    return [
        path, mode, str(callers), f"{m('rps'):.0f}", c.pct(m("rps") / c.median_of(raw, "rps")),
        c.fmt(m("p50_ms"), ".2f"), c.fmt(m("p99_ms"), ".2f"),
        f"{m('p50_ms') - c.median_of(raw, 'p50_ms'):+.2f}",
        c.fmt(m("ttfc_p50_ms"), ".2f") if mode == "stream" else "-",
        c.fmt(m("client_cpu_us_per_req"), ".0f"), c.fmt(m("server_cpu_us_per_req"), ".0f"),
        str(c.total(rs, "errors")),
    ]  # fmt: skip


def _over_raw(section: Section, one: dict[str, list[Result]], mode: str) -> None:
    """vibectld's p50 (unary) or time to first token (stream) over raw's, at 1 caller."""
    key, name, limit, what = (
        ("p50_ms", "p50", MAX_P50_OVER_RAW_MS, "latency (unary, 1 caller)")
        if mode == "unary"
        else (
            "ttfc_p50_ms",
            "TTFT p50",
            MAX_TTFT_OVER_RAW_MS,
            "time to first token (streaming, 1 caller)",
        )
    )
    v, raw = c.median_of(one["vibectld"], key), c.median_of(one["raw"], key)
    # Measured together (--strategy paired): the median of each repeat's difference.
    over = c.paired_delta(one["raw"], one["vibectld"], key)
    vs = c.Versus(f"provider {what}", AREA, ROW_MEASURES[mode], f"vibectld {name}", "raw")
    c.grade_ms_over(section, vs, v, raw, over, limit)


def _throughput(section: Section, many: dict[str, list[Result]]) -> None:
    v, raw = c.median_of(many["vibectld"], "rps"), c.median_of(many["raw"], "rps")
    vs = c.Versus("provider throughput (unary, 16 callers)", AREA,
                  "req/s at 16 callers, vs a raw HTTP client", "vibectld", "raw")  # fmt: skip
    c.grade_share(section, vs, v, raw, v / raw, MIN_RPS_RATIO)
    if "llm-stock" not in many:
        return
    stock, pooled = c.median_of(many["llm-stock"], "rps"), c.median_of(many["llm-pooled"], "rps")
    cpu = {p: c.fmt(c.median_of(many[p], "client_cpu_us_per_req"), ".0f") for p in many}
    section.check(
        "llm's stock model vs vibectld's pooled one (16 callers, in-process)", None,
        f"stock AsyncChat {stock:.0f} req/s ({stock / raw:.0%} of raw), pooled {pooled:.0f} "
        f"req/s ({pooled / raw:.0%} of raw); client CPU per call {cpu['llm-stock']} us vs "
        f"{cpu['llm-pooled']} us",
    )  # fmt: skip
    measure = (
        "req/s at 16 callers: llm's stock OpenAI model / vibectld's pooled one (in-process) / "
        "vibectld"
    )
    section.row(AREA, measure, f"{stock:.0f} / {pooled:.0f} / {v:.0f} (raw {raw:.0f})")
