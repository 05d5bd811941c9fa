"""Isolation: a client hammering far past its rpm limit must not slow down the others."""

from __future__ import annotations

import math

from bench import common as c
from bench.common import Context, Section
from bench.result import Result, median, percentile
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

SUMMARY = {
    "10x": f"normal client's p99 while another runs at {OVERSHOOT}x its rpm",
    "elsewhere": "control: the same abuser against a second vibectld (the machine's share)",
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
    windows = abuser.on_windows or []
    samples = normal.samples or []
    if not windows or not samples:
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


def _pair(paused: list[dict[str, float]], sending: list[dict[str, float]], key: str) -> str:
    a, b = median(r[key] for r in paused), median(r[key] for r in sending)
    return f"{c.fmt(a, '.3f')} / {c.fmt(b, '.3f')}"


def _target(d: Vibectld, name: str, **fields: object) -> list[str]:
    return [*c.target(name, port=d.port, ca=d.ca_path, **fields), "--call-timeout", "10"]


def run(ctx: Context) -> Section:
    s = ctx.settings
    duty, span = (QUICK_DUTY, QUICK_SPAN) if s.quick else (DUTY, SPAN)
    section = Section("isolation", "Isolation", INTRO.format(on=duty[0], off=duty[1], span=span))
    daemon = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="isolation")
    daemon.start()
    c.warm_up(ctx, daemon.port, daemon.ca_path, daemon.secret)
    kinds = KINDS[:1] if s.quick else KINDS
    other: Vibectld | None = None
    if "elsewhere" in kinds:
        other = Vibectld(ctx.procs, ctx.workdir, ctx.sockdir, name="isolation-control")
        other.start()
        c.warm_up(ctx, other.port, other.ca_path, other.secret)
    normal_env = clean_env(VIBECTLD_BENCH_SECRET=daemon.secret)
    # Long enough to cover the abuser's start-up, burst and whole duty cycle.
    normal_args = _target(daemon, "normal", pid=daemon.pid)
    normal_args += ["--rate", str(NORMAL_RATE), "--warmup", "1", "--duration", str(span + 6)]
    normal_args += ["--keep-samples"]
    # kind -> one {"paused": stats, "sending": stats} per repeat, and the abuser's results
    runs: dict[str, list[dict[str, dict[str, float]]]] = {k: [] for k in kinds}
    abusers: dict[str, list[Result]] = {k: [] for k in kinds}
    try:
        for rep in range(s.repeats):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                target = other if kind == "elsewhere" and other is not None else daemon
                secret = target.issue(f"abuser-{rep}-{kind}", rpm=ABUSER_RPM)
                abuser_args = _target(target, f"abuser-{kind}")
                if kind == "flood":
                    abuser_args += ["--callers", str(FLOOD_CALLERS)]
                else:
                    abuser_args += ["--rate", str(OVERSHOOT * ABUSER_RPM / 60), "--callers", "8"]
                # Its warm-up (refused calls, sent all the time) lets the normal client's
                # measurement start before the abuser's first on/off cycle.
                abuser_args += ["--burst", str(ABUSER_RPM), "--warmup", "1.5"]
                abuser_args += ["--duration", str(span), "--duty", str(duty[0]), str(duty[1])]
                abuser = c.start_load(abuser_args, clean_env(VIBECTLD_BENCH_SECRET=secret))
                normal = c.start_load(normal_args, normal_env)
                r, a = c.finish_load(normal, span + 60), c.finish_load(abuser, span + 60)
                c.check_errors(section, f"normal client, {kind}", r)
                c.check_errors(section, f"abuser, {kind}", a, refusals_ok=True)
                paused, sending = _split(r, a, duty)
                runs[kind].append({"paused": _stats(paused), "sending": _stats(sending)})
                abusers[kind].append(a)
                _log(ctx, rep, kind, runs[kind][-1], a)
                if not paused or not sending:
                    section.failures.append(
                        f"{kind}: the normal client's calls did not cover the abuser's cycle"
                    )
    finally:
        daemon.stop()
        if other is not None:
            other.stop()
    report(section, runs, abusers, duty)
    return section


def _log(ctx: Context, rep: int, kind: str, got: dict[str, dict[str, float]], a: Result) -> None:
    paused, sending = got["paused"], got["sending"]
    ctx.log(
        f"  rep {rep + 1} {kind:5} normal p50/p99 ms: abuser paused {paused['p50']:.3f} / "
        f"{paused['p99']:.3f} ({paused['n']:.0f} calls), sending {sending['p50']:.3f} / "
        f"{sending['p99']:.3f} ({sending['n']:.0f} calls); abuser {a.rps:.1f} ok/s, "
        f"{a.refused_per_s:.0f} refused/s while sending"
    )


def report(
    section: Section,
    runs: dict[str, list[dict[str, dict[str, float]]]],
    abusers: dict[str, list[Result]],
    duty: tuple[float, float],
) -> None:
    header = [
        "abuser", "normal p50 ms paused / sending", "p90 ms paused / sending",
        "p99 ms paused / sending", "p99 change", "calls paused / sending (per run)",
        "abuser served / refused per s while sending",
    ]  # fmt: skip
    rows: list[list[str]] = []
    change: dict[str, float] = {}
    p99: dict[str, tuple[float, float]] = {}  # kind -> (abuser sending, abuser paused)
    # The abuser's req/s and refusals are over its whole window, part of which it is silent.
    sending_share = duty[0] / (duty[0] + duty[1])
    for kind, got in runs.items():
        paused, sending = [x["paused"] for x in got], [x["sending"] for x in got]
        p99[kind] = (median(x["p99"] for x in sending), median(x["p99"] for x in paused))
        change[kind] = p99[kind][0] / p99[kind][1] - 1
        calls = f"{median(x['n'] for x in paused):.0f} / {median(x['n'] for x in sending):.0f}"
        served = c.median_of(abusers[kind], "rps") / sending_share
        refused = c.median_of(abusers[kind], "refused_per_s") / sending_share
        rows.append(
            [LABEL[kind], *(_pair(paused, sending, q) for q in ("p50", "p90", "p99")),
             f"{change[kind]:+.0%}", calls, f"{served:.1f} / {refused:.0f}"]
        )  # fmt: skip
    section.tables.append(c.md_table(header, rows))
    p99_on, p99_off = p99["10x"]
    ok = not math.isnan(change["10x"]) and change["10x"] < MAX_P99_INCREASE
    section.check(
        f"isolation (abuser at {OVERSHOOT}x its rpm)", ok,
        f"normal client p99 {p99_on:.3f} ms while the abuser sends vs {p99_off:.3f} ms while "
        f"it pauses: {change['10x']:+.0%} (target < +{MAX_P99_INCREASE:.0%})",
    )  # fmt: skip
    if "elsewhere" in change:
        section.check(
            "isolation control, abuser on another daemon", None,
            f"normal client p99 {change['elsewhere']:+.0%} when the same abuser runs against "
            "a second vibectld: the machine's share of the change",
        )  # fmt: skip
    if "flood" in change:
        detail = f"normal client p99 {change['flood']:+.0%} while the abuser floods (see the table)"
        section.check("isolation, flooding abuser", None, detail)
    for kind, measure in SUMMARY.items():
        if kind in change:
            result = f"{change[kind]:+.0%} ({p99[kind][0]:.2f} vs {p99[kind][1]:.2f} ms)"
            graded = kind == "10x"
            target = f"< +{MAX_P99_INCREASE:.0%}" if graded else "-"
            section.row("Isolation", measure, result, target, ok if graded else None)
