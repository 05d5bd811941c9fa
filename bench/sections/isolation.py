"""Isolation: a client hammering far past its rpm limit must not slow down the others."""

from __future__ import annotations

import math

from bench.common import (
    Context,
    Result,
    Section,
    SummaryRow,
    check_errors,
    finish_load,
    fmt,
    md_table,
    median,
    start_load,
    warm_up,
)
from bench.loadgen import percentile
from bench.servers import Vibectld, clean_env

ABUSER_RPM = 600
OVERSHOOT = 10  # the abuser sends this many times its rpm limit
NORMAL_RATE = 200.0  # requests/s of the well-behaved client, open loop
FLOOD_CALLERS = 4
MAX_P99_INCREASE = 0.20  # the target
# The abuser alternates: ON seconds sending, OFF seconds silent, for SPAN seconds.
DUTY = (1.0, 1.0)
SPAN = 16.0
QUICK_DUTY = (0.5, 0.5)
QUICK_SPAN = 4.0
# Normal calls that start this close to an abuser on/off switch belong to neither side.
MARGIN_S = 0.05

KINDS = ("10x", "elsewhere", "flood")
LABEL = {
    "10x": f"abuser at {OVERSHOOT}x its limit ({OVERSHOOT * ABUSER_RPM // 60}/s, rpm {ABUSER_RPM})",
    "elsewhere": "control: the same abuser aimed at a second vibectld [info]",
    "flood": f"abuser flooding ({FLOOD_CALLERS} closed-loop callers, rpm {ABUSER_RPM}) [info]",
}

INTRO = f"""\
One daemon (`echo` model). The normal client (no limits) sends {NORMAL_RATE:g} unary
requests per second, open loop, from its own process. Another process runs an abuser,
a client issued with `--rpm {ABUSER_RPM}`: either at {OVERSHOOT}x that
({OVERSHOOT * ABUSER_RPM // 60} requests/s, open loop), or, for information, as fast
as {FLOOD_CALLERS} closed-loop callers can. Each abuser is a new client that first
spends its whole minute's allowance ({ABUSER_RPM} calls) in a burst, so afterwards
nearly all of its calls are refused with RESOURCE_EXHAUSTED. The abuser then sends for
{{on:g}} s and pauses for {{off:g}} s, in turn, for {{span:g}} s: the normal
client's calls that start while it sends are compared with those that start while it
pauses (calls within {MARGIN_S * 1000:.0f} ms of a switch are left out), so the baseline is
taken in the same seconds as the abused run, under the same machine noise.

The control runs the same 10x abuser against a second vibectld on the same machine: the
normal client's daemon never sees it, so that row is what the abuser's processes cost the
machine (two cores shared by two daemons and two load generators), not the daemon."""


def _split(
    normal: Result, abuser: Result, duty: tuple[float, float]
) -> tuple[list[float], list[float]]:
    """The normal client's latencies (ms) while the abuser paused, and while it sent."""
    on, off = duty
    windows = abuser.get("on_windows") or []
    if not windows:
        return [], []
    samples = normal.get("samples") or []
    if not samples:
        return [], []
    # Whole abuser cycles that the normal client's measurement covers, nothing else.
    period = on + off
    first = windows[0][0]
    covered_from = math.ceil((samples[0][0] - first) / period) * period + first
    last = min(windows[-1][0] + period, samples[-1][0])
    paused: list[float] = []
    sending: list[float] = []
    for start, latency in samples:
        if not max(first, covered_from) <= start < last:
            continue
        phase = (start - first) % period
        if MARGIN_S <= phase < on - MARGIN_S:
            sending.append(latency)
        elif on + MARGIN_S <= phase < period - MARGIN_S:
            paused.append(latency)
    return paused, sending


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "n": float(len(values)),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
    }


def _median(runs: list[dict[str, float]], key: str) -> float:
    values = sorted(r[key] for r in runs if not math.isnan(r[key]))
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _pair(paused: list[dict[str, float]], sending: list[dict[str, float]], key: str) -> str:
    return f"{fmt(_median(paused, key), '.3f')} / {fmt(_median(sending, key), '.3f')}"


def run(ctx: Context) -> Section:
    s = ctx.settings
    duty, span = (QUICK_DUTY, QUICK_SPAN) if s.quick else (DUTY, SPAN)
    section = Section("isolation", "Isolation", INTRO.format(on=duty[0], off=duty[1], span=span))
    daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="isolation")
    daemon.start()
    warm_up(ctx, daemon.port, daemon.ca_path, daemon.secret)
    kinds = KINDS[:1] if s.quick else KINDS
    other: Vibectld | None = None
    if "elsewhere" in kinds:
        other = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="isolation-control")
        other.start()
        warm_up(ctx, other.port, other.ca_path, other.secret)
    normal_env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)

    def target_args(d: Vibectld) -> list[str]:
        return ["--port", str(d.port), "--ca", str(d.ca_path), "--call-timeout", "10"]

    common = target_args(daemon)
    # Long enough to cover the abuser's start-up, burst and whole duty cycle.
    normal_args = [
        *common, "--rate", str(NORMAL_RATE), "--warmup", "1", "--duration", str(span + 6),
        "--server-pid", str(daemon.pid), "--keep-samples", "--label", "normal",
    ]  # fmt: skip
    # kind -> one {"paused": stats, "sending": stats} per repeat
    runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in kinds}
    abusers: dict[str, list[Result]] = {k: [] for k in kinds}
    try:
        for rep in range(s.repeats):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                target = other if kind == "elsewhere" and other is not None else daemon
                secret = target.issue(f"abuser-{rep}-{kind}", rpm=ABUSER_RPM)
                shape = (
                    ["--callers", str(FLOOD_CALLERS)]
                    if kind == "flood"
                    else ["--rate", str(OVERSHOOT * ABUSER_RPM / 60), "--callers", "8"]
                )
                # Its warm-up (refused calls, sent all the time) lets the normal client's
                # measurement start before the abuser's first on/off cycle.
                abuser_args = [
                    *target_args(target), *shape, "--burst", str(ABUSER_RPM), "--warmup", "1.5",
                    "--duration", str(span), "--duty", str(duty[0]), str(duty[1]),
                    "--label", f"abuser {kind}",
                ]  # fmt: skip
                abuser = start_load(
                    "bench.load", abuser_args, clean_env(VIBECTLD_BENCH_SECRET=secret)
                )
                normal = start_load("bench.load", normal_args, normal_env)
                budget = span + 60
                r = finish_load("bench.load", normal, budget)
                a = finish_load("bench.load", abuser, budget)
                check_errors(section, f"normal client, {kind}", r)
                check_errors(section, f"abuser, {kind}", a, refusals_ok=True)
                paused, sending = _split(r, a, duty)
                got = {"paused": _stats(paused), "sending": _stats(sending)}
                runs[kind].append(got)
                abusers[kind].append(a)
                ctx.log(
                    f"  rep {rep + 1} {kind:5} normal p50/p99 ms: abuser paused "
                    f"{got['paused']['p50']:.3f} / {got['paused']['p99']:.3f} "
                    f"({len(paused)} calls), sending {got['sending']['p50']:.3f} / "
                    f"{got['sending']['p99']:.3f} ({len(sending)} calls); abuser "
                    f"{a['rps']:.1f} ok/s, {a['refused_per_s']:.0f} refused/s while sending"
                )
                if not paused or not sending:
                    section.failures.append(
                        f"{kind}: the normal client's calls did not cover the abuser's cycle"
                    )
    finally:
        daemon.stop()
        if other is not None:
            other.stop()

    header = [
        "abuser", "normal p50 ms paused / sending", "p90 ms paused / sending",
        "p99 ms paused / sending", "p99 change", "calls paused / sending (per run)",
        "abuser served / refused per s while sending",
    ]  # fmt: skip
    rows: list[list[str]] = []
    change: dict[str, float] = {}
    p99: dict[str, tuple[float, float]] = {}  # kind -> (abuser sending, abuser paused)
    for kind in kinds:
        paused_runs = [x["paused"] for x in runs[kind]]
        sending_runs = [x["sending"] for x in runs[kind]]
        p99[kind] = (_median(sending_runs, "p99"), _median(paused_runs, "p99"))
        change[kind] = p99[kind][0] / p99[kind][1] - 1
        ab = abusers[kind]
        # Its req/s and refusals are over its whole window, half of which it is silent.
        sending_share = duty[0] / (duty[0] + duty[1])
        rows.append(
            [
                LABEL[kind],
                _pair(paused_runs, sending_runs, "p50"),
                _pair(paused_runs, sending_runs, "p90"),
                _pair(paused_runs, sending_runs, "p99"),
                f"{change[kind]:+.0%}",
                f"{_median(paused_runs, 'n'):.0f} / {_median(sending_runs, 'n'):.0f}",
                f"{median(ab, 'rps') / sending_share:.1f} / "
                f"{median(ab, 'refused_per_s') / sending_share:.0f}",
            ]
        )
    section.tables.append(md_table(header, rows))
    p99_on, p99_off = p99["10x"]
    ok = not math.isnan(change["10x"]) and change["10x"] < MAX_P99_INCREASE
    section.check(
        f"isolation (abuser at {OVERSHOOT}x its rpm)",
        ok,
        f"normal client p99 {p99_on:.3f} ms while the abuser sends vs {p99_off:.3f} ms while "
        f"it pauses: {change['10x']:+.0%} (target < +{MAX_P99_INCREASE:.0%})",
    )
    if "elsewhere" in change:
        section.check(
            "isolation control, abuser on another daemon",
            None,
            f"normal client p99 {change['elsewhere']:+.0%} when the same abuser runs against "
            "a second vibectld: the machine's share of the change",
        )
    if "flood" in change:
        section.check(
            "isolation, flooding abuser",
            None,
            f"normal client p99 {change['flood']:+.0%} while the abuser floods (see the table)",
        )
    summary = [("10x", f"normal client's p99 while another runs at {OVERSHOOT}x its rpm")]
    if "elsewhere" in change:
        summary.append(
            (
                "elsewhere",
                "control: the same abuser against a second vibectld (the machine's share)",
            )
        )
    for kind, measure in summary:
        graded = kind == "10x"
        section.summary.append(
            SummaryRow(
                "Isolation",
                measure,
                f"{change[kind]:+.0%} ({p99[kind][0]:.2f} vs {p99[kind][1]:.2f} ms)",
                f"< +{MAX_P99_INCREASE:.0%}" if graded else "-",
                ("PASS" if ok else "FAIL") if graded else "-",
            )
        )
    return section
