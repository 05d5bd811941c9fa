"""Footprint: the daemon's start-up time and memory, and the client's cold start."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from bench import common as c
from bench.common import Context, Section
from bench.result import Result, median
from bench.servers import BenchError, Vibectld, clean_env, rss_kib, thread_count, tool

CALLS = 100_000  # per phase; RSS is read after each of two phases
QUICK_CALLS = 2_000
CALLERS = 16
MAX_RSS_GROWTH = 0.10  # between CALLS and 2 * CALLS calls
COLD_STARTS = 3  # fresh state directory each time (CA, certificate, signing key created)
WARM_STARTS = 5  # the same state directory again
CLIENT_RUNS = 7
QUICK_CLIENT_RUNS = 1

INTRO = """\
Start-up: the time from spawning `vibectld` to the READY=1 datagram on a NOTIFY_SOCKET
the benchmark binds (as systemd's Type=notify sees it), with a fresh state directory
(the CA, server certificate and signing key are created) and with an existing one.
Memory: the daemon's RSS (VmRSS) after start, then after {calls:,} and {calls2:,} unary
`echo` calls from {callers} closed-loop callers (JSON request logs to a file).
Client: wall time of `vibectl ask --model echo hi` as a new process, in proxy mode (a
profile set up with `vibectl setup-proxy configure URL`) and in direct mode
(`vibectl --no-proxy ask ...`, the llm library in-process), alternating, with
VIBECTL_CONFIG_DIR and LLM_USER_PATH in a scratch directory; `python -c pass` with the
same interpreter is the floor of any Python command."""


def _row(what: str, values: list[float], spec: str) -> list[str]:
    if not values:
        return [what, "-", "-", "0"]
    low, high = format(min(values), spec), format(max(values), spec)
    return [what, format(median(values), spec), f"{low} / {high}", str(len(values))]


def _ready_times(ctx: Context, cold: int, warm: int) -> tuple[list[float], list[float], Vibectld]:
    cold_s: list[float] = []
    warm_s: list[float] = []
    last: Vibectld | None = None
    for i in range(cold):
        d = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name=f"fp-{i}")
        d.start(notify=True, issue=False)
        assert d.ready_s is not None
        cold_s.append(d.ready_s)
        d.stop()
        last = d
    assert last is not None
    for _ in range(warm):
        last.start(notify=True, issue=False)
        assert last.ready_s is not None
        warm_s.append(last.ready_s)
        last.stop()
    return cold_s, warm_s, last


def _run_client(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    seconds = time.perf_counter() - t0
    if out.returncode != 0 or "hi" not in out.stdout:
        raise BenchError(
            f"{' '.join(argv[:4])}... failed (exit {out.returncode}): "
            f"{(out.stdout + out.stderr).strip()[-500:]}"
        )
    return seconds


def _imports_llm(env: dict[str, str]) -> tuple[bool, str]:
    """Whether proxy-mode `vibectl ask` imports llm, and its slowest top-level imports."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "vibectl", "ask", "--model", "echo", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    top: dict[str, int] = {}
    llm = False
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)", line)
        if not m:
            continue
        cumulative, indent, name = int(m.group(1)), len(m.group(2)), m.group(3)
        if name == "llm" or name.startswith("llm."):
            llm = True
        if indent == 1:
            top[name] = max(top.get(name, 0), cumulative)
    slowest = sorted(top.items(), key=lambda kv: -kv[1])[:5]
    return llm, ", ".join(f"{name} {us / 1000:.0f} ms" for name, us in slowest)


def _client_cold_start(
    ctx: Context, daemon: Vibectld, runs: int
) -> tuple[list[float], list[float], list[float], tuple[bool, str]]:
    home = ctx.workdir / "client"
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "llm").mkdir(parents=True, exist_ok=True)
    env = clean_env(
        VIBECTL_CONFIG_DIR=str(home / "config"),
        LLM_USER_PATH=str(home / "llm"),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "xdg"),
    )
    url = daemon.issue_url("cold-start")
    setup = subprocess.run(
        [tool("vibectl"), "setup-proxy", "configure", url, "--name", "bench"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if setup.returncode != 0:
        raise BenchError(f"vibectl setup-proxy configure failed: {setup.stderr.strip()[-500:]}")
    vibectl = tool("vibectl")
    proxy_argv = [vibectl, "ask", "--model", "echo", "hi"]
    direct_argv = [vibectl, "--no-proxy", "ask", "--model", "echo", "hi"]
    if not ctx.settings.quick:
        # One unmeasured run of each: the page cache, .pyc files.
        _run_client(proxy_argv, env)
        _run_client(direct_argv, env)
    proxy: list[float] = []
    direct: list[float] = []
    bare: list[float] = []
    for i in range(runs):
        pair = [(proxy_argv, proxy), (direct_argv, direct)]
        for argv, into in pair if i % 2 == 0 else pair[::-1]:
            into.append(_run_client(argv, env))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], env=env, check=True, timeout=60)
        bare.append(time.perf_counter() - t0)
    return proxy, direct, bare, _imports_llm(env)


def run(ctx: Context) -> Section:
    s = ctx.settings
    calls = QUICK_CALLS if s.quick else CALLS
    intro = INTRO.format(calls=calls, calls2=2 * calls, callers=CALLERS)
    section = Section("footprint", "Footprint", intro)
    cold_n, warm_n = (1, 0) if s.quick else (COLD_STARTS, WARM_STARTS)
    cold, warm, daemon = _ready_times(ctx, cold_n, warm_n)
    ctx.log(
        f"  READY=1 after {median(cold):.2f} s (fresh state), {median(warm):.2f} s (existing state)"
    )
    rss: list[tuple[str, int, int, float | None]] = []
    try:
        daemon.start()
        time.sleep(1.0)
        rss.append(("idle, after start", rss_kib(daemon.pid), thread_count(daemon.pid), None))
        env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)
        for phase in (1, 2):
            name = f"phase-{phase}"
            args = c.target(name, port=daemon.port, ca=daemon.ca_path, channels=s.channels)
            args += ["--callers", str(CALLERS), "--duration", "590", "--warmup", "0"]
            args += ["--max-requests", str(calls)]
            got: dict[str, list[Result]] = {}
            c.collect(
                ctx, section, got, c.measure_load(args, env=env, budget=700), f"{calls:,} calls"
            )
            what = f"after {phase * calls:,} calls"
            rss.append((what, rss_kib(daemon.pid), thread_count(daemon.pid), got[name][0].rps))
        runs = QUICK_CLIENT_RUNS if s.quick else CLIENT_RUNS
        client = _client_cold_start(ctx, daemon, runs)
    finally:
        daemon.stop()
    report(section, calls, rss, {"cold": cold, "warm": warm}, client)
    return section


def report(
    section: Section,
    calls: int,
    rss: list[tuple[str, int, int, float | None]],
    ready: dict[str, list[float]],
    client: tuple[list[float], list[float], list[float], tuple[bool, str]],
) -> None:
    proxy, direct, bare, (imports_llm, slowest) = client
    cold, warm = median(ready["cold"]), median(ready["warm"])
    rows = [
        [what, f"{kib / 1024:.1f}", str(threads), f"{rps:.0f}" if rps else "-"]
        for what, kib, threads, rps in rss
    ]
    section.tables.append(c.md_table(["vibectld", "RSS MiB", "threads", "load req/s"], rows))
    rows = [
        _row("vibectld to READY=1, fresh state", ready["cold"], ".2f"),
        _row("vibectld to READY=1, existing state", ready["warm"], ".2f"),
        _row("`vibectl ask` proxy mode", proxy, ".3f"),
        _row("`vibectl --no-proxy ask` direct mode", direct, ".3f"),
        _row("`python -c pass`", bare, ".3f"),
    ]
    section.tables.append(c.md_table(["start-up", "median s", "min / max s", "runs"], rows))
    before, after = rss[1][1], rss[2][1]
    growth = after / before - 1
    ok = growth <= MAX_RSS_GROWTH
    section.check(
        "memory growth", ok,
        f"RSS {before / 1024:.1f} MiB after {calls:,} calls, {after / 1024:.1f} MiB after "
        f"{2 * calls:,}: {growth:+.1%} (target <= +{MAX_RSS_GROWTH:.0%})",
    )  # fmt: skip
    detail = f"slowest imports: {slowest}"
    section.check("proxy-mode client does not import llm", not imports_llm, detail)
    p, d = median(proxy), median(direct)
    section.check("client cold start", None, f"proxy {p:.3f} s vs direct {d:.3f} s ({p / d:.0%})")
    k, k2 = calls // 1000, 2 * calls // 1000
    mib = " / ".join(f"{kib / 1024:.0f}" for _, kib, _, _ in rss) + " MiB"
    section.row("Footprint", f"vibectld RSS idle / after {k}k / after {k2}k calls", mib)
    measure = f"RSS growth from {k}k to {k2}k calls"
    section.row("Footprint", measure, f"{growth:+.1%}", f"<= +{MAX_RSS_GROWTH:.0%}", ok)
    measure = "start to READY=1 (fresh / existing state dir)"
    section.row("Footprint", measure, f"{cold:.2f} s / {warm:.2f} s")
    section.row(
        "Footprint", "`vibectl ask` cold start, proxy / direct mode", f"{p:.2f} s / {d:.2f} s"
    )
