"""The real provider path: a fake OpenAI-compatible endpoint with a fixed 20 ms latency,
called directly (raw HTTP with aiohttp and with httpx), through the llm library in-process (as
vibectld registers endpoints, and llm's stock way), and through vibectld."""

from __future__ import annotations

import math
import tempfile

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
    pct,
    result_line,
    total,
    warm_up,
)
from bench.servers import FakeProvider, Vibectld, clean_env

LATENCY_MS = 20.0
MODEL_ID = "fake-gpt"
MODEL_NAME = "fake"
# (path, what it is); "vibectld" goes through bench.load, the others bench.provider_load.
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

INTRO = f"""\
A fake OpenAI-compatible endpoint (`bench/fake_provider.py`: tests/fake_openai.py in a
separate process, TCP_NODELAY like a real server) answers every chat completion after a fixed
{LATENCY_MS:g} ms, as one JSON document or as an SSE stream. Each path is driven
closed-loop from its own load-generator process (`bench/provider_load.py`; for vibectld,
`bench/load.py`); at 1 caller, raw and vibectld are measured by one process that
alternates single calls between them (`bench/paired.py`; req/s there is 1 / mean
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
    models = {
        "default": "echo",
        "openai_compatible": [
            {"model_id": MODEL_ID, "model_name": MODEL_NAME, "api_base": fake.api_base}
        ],
    }
    daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="provider", models=models)
    daemon.start()
    # The daemon's first provider call creates the pooled client: not part of any measurement.
    warm_up(ctx, daemon.port, daemon.ca_path, daemon.secret, model=MODEL_ID)
    ctx.log(f"  fake provider pid {fake.pid} at {fake.api_base}; vibectld pid {daemon.pid}")
    llm_home = tempfile.mkdtemp(prefix="llm-", dir=ctx.workdir)
    env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret, LLM_USER_PATH=llm_home)
    duration, warmup = _settings(ctx)
    paths = [p for p, _ in PATHS if not s.quick or p in QUICK_PATHS]
    cells: dict[tuple[str, int], dict[str, list[Result]]] = {}
    try:
        for mode, callers in CONFIGS:
            got: dict[str, list[Result]] = {p: [] for p in paths}
            # At 1 caller raw and vibectld are measured by one process alternating calls.
            units = (
                ["raw+vibectld", *(p for p in paths if p not in ("raw", "vibectld"))]
                if callers == 1
                else paths
            )
            for rep in range(s.repeats):
                # Rotate the order so no path always runs first (or last).
                order = units[rep % len(units) :] + units[: rep % len(units)]
                for path in order:
                    common = [
                        "--mode", mode, "--duration", str(duration), "--warmup", str(warmup),
                    ]  # fmt: skip
                    if path == "raw+vibectld":
                        args = [
                            "--vibectld-port", str(daemon.port), "--vibectld-pid",
                            str(daemon.pid), "--ca", str(daemon.ca_path), "--model", MODEL_ID,
                            "--api-base", fake.api_base, "--mode", mode,
                            "--duration", str(2 * duration), "--warmup", str(warmup),
                        ]  # fmt: skip
                        pair = measure_load("bench.paired", args, env=env)
                        for name in ("raw", "vibectld"):
                            got[name].append(pair[name])
                            tag = f"  {mode:6} x1   rep {rep + 1} {name:10} (paired)"
                            ctx.log(result_line(tag, pair[name]))
                            check_errors(section, f"{name} {mode} x1", pair[name])
                        continue
                    common += ["--callers", str(callers), "--label", path]
                    if path == "vibectld":
                        args = [
                            "--port", str(daemon.port), "--ca", str(daemon.ca_path),
                            "--model", MODEL_ID, "--server-pid", str(daemon.pid), *common,
                        ]  # fmt: skip
                        r = measure_load("bench.load", args, env=env)
                    else:
                        args = ["--api-base", fake.api_base, "--path", path, *common]
                        r = measure_load("bench.provider_load", args, env=env)
                    got[path].append(r)
                    ctx.log(result_line(f"  {mode:6} x{callers:<3} rep {rep + 1} {path:10}", r))
                    check_errors(section, f"{path} {mode} x{callers}", r)
            cells[(mode, callers)] = got
    finally:
        daemon.stop()
        if fake.proc is not None:
            ctx.procs.stop(fake.proc)
    _report(section, cells)
    return section


def _report(section: Section, cells: dict[tuple[str, int], dict[str, list[Result]]]) -> None:
    header = [
        "path", "mode", "callers", "req/s", "vs raw", "p50 ms", "p99 ms", "p50 over raw ms",
        "first text p50 ms", "client CPU us/req", "vibectld CPU us/req", "errors",
    ]  # fmt: skip
    rows: list[list[str]] = []
    for (mode, callers), got in cells.items():
        base = got["raw"]
        for path, _ in PATHS:
            if path not in got:
                continue
            rs = got[path]
            rows.append(
                [
                    path,
                    mode,
                    str(callers),
                    f"{median(rs, 'rps'):.0f}",
                    pct(median(rs, "rps") / median(base, "rps")),
                    fmt(median(rs, "p50_ms"), ".2f"),
                    fmt(median(rs, "p99_ms"), ".2f"),
                    f"{median(rs, 'p50_ms') - median(base, 'p50_ms'):+.2f}",
                    fmt(median(rs, "ttfc_p50_ms"), ".2f") if mode == "stream" else "-",
                    fmt(median(rs, "client_cpu_us_per_req"), ".0f"),
                    fmt(median(rs, "server_cpu_us_per_req"), ".0f"),
                    str(total(rs, "errors")),
                ]
            )
    section.tables.append(md_table(header, rows))
    section.tables.append(md_table(["path", "what it is"], [[p, w] for p, w in PATHS]))

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    one = cells.get(("unary", 1))
    if one:
        v, raw = median(one["vibectld"], "p50_ms"), median(one["raw"], "p50_ms")
        # Measured together (bench/paired.py): the median of each repeat's difference.
        over = paired_delta(one["raw"], one["vibectld"], "p50_ms")
        ok = over <= MAX_P50_OVER_RAW_MS
        section.check(
            "provider latency (unary, 1 caller)",
            ok,
            f"vibectld p50 {v:.2f} ms vs raw {raw:.2f} ms: {over:+.2f} ms "
            f"(target <= +{MAX_P50_OVER_RAW_MS:g} ms)",
        )
        section.summary.append(
            SummaryRow(
                "Provider (20 ms fake)",
                "p50 at 1 caller, over a raw HTTP client",
                f"{over:+.2f} ms ({v:.2f} vs {raw:.2f})",
                f"<= +{MAX_P50_OVER_RAW_MS:g} ms",
                verdict(ok),
            )
        )
    many = cells.get(("unary", 16))
    if many:
        v, raw = median(many["vibectld"], "rps"), median(many["raw"], "rps")
        ratio = v / raw
        ok = ratio >= MIN_RPS_RATIO
        section.check(
            "provider throughput (unary, 16 callers)",
            ok,
            f"vibectld {v:.0f} req/s = {ratio:.0%} of raw {raw:.0f} "
            f"(target >= {MIN_RPS_RATIO:.0%})",
        )
        section.summary.append(
            SummaryRow(
                "Provider (20 ms fake)",
                "req/s at 16 callers, vs a raw HTTP client",
                f"{ratio:.0%} ({v:.0f} vs {raw:.0f})",
                f">= {MIN_RPS_RATIO:.0%}",
                verdict(ok),
            )
        )
    if many and "llm-stock" in many:
        stock, pooled = median(many["llm-stock"], "rps"), median(many["llm-pooled"], "rps")
        raw = median(many["raw"], "rps")
        section.check(
            "llm's stock model vs vibectld's pooled one (16 callers, in-process)",
            None,
            f"stock AsyncChat {stock:.0f} req/s ({stock / raw:.0%} of raw), "
            f"pooled {pooled:.0f} req/s ({pooled / raw:.0%} of raw); client CPU per call "
            f"{fmt(median(many['llm-stock'], 'client_cpu_us_per_req'), '.0f')} us vs "
            f"{fmt(median(many['llm-pooled'], 'client_cpu_us_per_req'), '.0f')} us",
        )
        section.summary.append(
            SummaryRow(
                "Provider (20 ms fake)",
                "req/s at 16 callers: llm's stock OpenAI model / vibectld's pooled one "
                "(in-process) / vibectld",
                f"{stock:.0f} / {pooled:.0f} / {median(many['vibectld'], 'rps'):.0f} "
                f"(raw {raw:.0f})",
                "-",
                "-",
            )
        )
    stream = cells.get(("stream", 1))
    if stream:
        v, raw = median(stream["vibectld"], "ttfc_p50_ms"), median(stream["raw"], "ttfc_p50_ms")
        over = paired_delta(stream["raw"], stream["vibectld"], "ttfc_p50_ms")
        ok = not math.isnan(over) and over <= MAX_TTFT_OVER_RAW_MS
        section.check(
            "provider time to first token (streaming, 1 caller)",
            ok,
            f"vibectld TTFT p50 {v:.2f} ms vs raw {raw:.2f} ms: {over:+.2f} ms "
            f"(target <= +{MAX_TTFT_OVER_RAW_MS:g} ms)",
        )
        section.summary.append(
            SummaryRow(
                "Provider (20 ms fake)",
                "streaming time to first token at 1 caller, over raw",
                f"{over:+.2f} ms ({v:.2f} vs {raw:.2f})",
                f"<= +{MAX_TTFT_OVER_RAW_MS:g} ms",
                verdict(ok),
            )
        )
