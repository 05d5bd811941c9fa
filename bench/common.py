"""What every section of the benchmark shares: the run context, measurements, results.

A section is a function `run(ctx) -> Section`: it starts the processes it needs (and
stops them), measures, and returns its tables, its target checks and the rows it
contributes to the summary table.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.result import Result, median
from bench.servers import REPO, BenchError, Processes, clean_env


@dataclass(frozen=True)
class Settings:
    """How long and how often to measure; --quick shrinks everything."""

    quick: bool
    repeats: int
    duration: float  # measured seconds of one closed-loop measurement
    warmup: float
    channels: int
    verbose: bool = True


@dataclass
class Context:
    settings: Settings
    procs: Processes
    workdir: Path
    sockdir: Path

    def log(self, text: str) -> None:
        if self.settings.verbose:
            print(text, flush=True)


@dataclass(frozen=True)
class Check:
    """One target: PASS/FAIL, or info (passed None) for a number without a target."""

    name: str
    passed: bool | None
    detail: str

    @property
    def verdict(self) -> str:
        return "info" if self.passed is None else ("PASS" if self.passed else "FAIL")

    def line(self) -> str:
        return f"{self.verdict:4}  {self.name}: {self.detail}"


@dataclass(frozen=True)
class SummaryRow:
    """One line of the README's results table."""

    area: str
    measure: str
    result: str
    target: str
    verdict: str  # PASS, FAIL or "-"


@dataclass
class Section:
    key: str
    title: str
    intro: str = ""
    tables: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[SummaryRow] = field(default_factory=list)
    # Measurements that failed or saw errors: the run exits 1.
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, name: str, passed: bool | None, detail: str) -> Check:
        c = Check(name, passed, detail)
        self.checks.append(c)
        return c

    def graded(self, name: str, passed: bool, detail: str, row: tuple[str, str, str, str]) -> None:
        """A check with a target, and its row (area, measure, result, target) in the summary."""
        self.check(name, passed, detail)
        self.row(*row, passed=passed)

    def row(
        self, area: str, measure: str, result: str, target: str = "-", passed: bool | None = None
    ) -> None:
        """A row of the summary table; `passed` None (no target) shows as "-"."""
        verdict = "-" if passed is None else ("PASS" if passed else "FAIL")
        self.summary.append(SummaryRow(area, measure, result, target, verdict))

    def text(self) -> str:
        """The section as printed on the terminal (and, less the heading, as markdown)."""
        parts = [f"## {self.title}", ""]
        if self.intro:
            parts += [self.intro, ""]
        for t in self.tables:
            parts += [t, ""]
        if self.checks:
            parts += [f"- {c.line()}" for c in self.checks] + [""]
        if self.notes:
            parts += [f"Note: {n}" for n in self.notes] + [""]
        for failure in self.failures:
            parts.append(f"ERROR  {failure}")
        if self.failures:
            parts.append("")
        parts.append(f"({self.seconds:.0f} s)")
        return "\n".join(parts)


def target(name: str, **fields: object) -> list[str]:
    """A `--target` of bench.load: `secret_env=` becomes `secret-env=`; None is left out."""
    parts = [f"name={name}"]
    parts += [f"{k.replace('_', '-')}={v}" for k, v in fields.items() if v is not None]
    return ["--target", ",".join(parts)]


def _argv(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "bench.load", "--json", *args]


def measure_load(
    args: Sequence[str], *, env: dict[str, str] | None = None, budget: float = 120.0
) -> dict[str, Result]:
    """One run of bench.load: each target's name and its result."""
    try:
        out = subprocess.run(
            _argv(args),
            cwd=REPO,
            env=env if env is not None else dict(os.environ),
            capture_output=True,
            text=True,
            timeout=budget,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"bench.load did not finish within {budget:.0f} s") from None
    return _parse(out.returncode, out.stdout, out.stderr)


def _parse(returncode: int | None, stdout: str, stderr: str) -> dict[str, Result]:
    lines = stdout.strip().splitlines()
    try:
        data = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(
            f"bench.load failed (exit {returncode}): {stderr.strip()[-2000:]}"
        ) from None
    return {name: Result.from_json(r) for name, r in data.items()}


def start_load(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """bench.load running in the background; finish it with `finish_load`."""
    return subprocess.Popen(
        _argv(args), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_load(proc: subprocess.Popen[str], budget: float) -> Result:
    """The one result of a background closed-loop run."""
    try:
        stdout, stderr = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"bench.load did not finish within {budget:.0f} s") from None
    (result,) = _parse(proc.returncode, stdout, stderr).values()
    return result


def collect(
    ctx: Context, section: Section, got: dict[str, list[Result]], run: dict[str, Result], tag: str
) -> None:
    """Keep each target's result of one run, log it, and record any errors it saw."""
    for name, r in run.items():
        got.setdefault(name, []).append(r)
        ctx.log(result_line(f"  {tag} {name:10}", r))
        check_errors(section, f"{name} {tag}", r)


def median_of(results: Sequence[object], key: str) -> float:
    """The median of one field over results (NaN when none has it); any type with the field."""
    return median(getattr(r, key) for r in results)


def total(results: Sequence[object], key: str) -> int:
    return sum(int(getattr(r, key) or 0) for r in results)


def fmt(value: float | None, spec: str = ".2f", none: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return none
    return format(value, spec)


def pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.0%}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def result_line(name: str, r: Result) -> str:
    """A one-line progress report of one measurement."""
    text = (
        f"{name}: {r.rps:8.1f} req/s  p50 {fmt(r.p50_ms, '.3f')} ms  p99 {fmt(r.p99_ms, '.3f')} ms"
    )
    if r.ttfc_p50_ms is not None:
        text += f"  first text p50 {fmt(r.ttfc_p50_ms, '.3f')} ms"
    text += f"  errors {r.errors}"
    if r.refused:
        text += f"  refused {r.refused}"
    return text


def check_errors(section: Section, name: str, r: Result, *, refusals_ok: bool = False) -> None:
    """Record a measurement that saw errors (or, unless expected, refusals) or no success."""
    refused = 0 if refusals_ok else r.refused
    if r.errors or refused or not (r.count or (refusals_ok and r.refused)):
        section.failures.append(
            f"{name}: {r.errors} errors, {refused} refused, {r.count} ok; "
            f"e.g. {r.error_samples[:2]}"
        )


def warm_up(ctx: Context, port: int, ca: Path, secret: str, model: str = "echo") -> None:
    """A short unmeasured load on a freshly started daemon (first calls are slower)."""
    calls = 100 if ctx.settings.quick else 500
    args = target("warm-up", port=port, ca=ca, model=model)
    args += ["--callers", "16", "--max-requests", str(calls), "--duration", "60", "--warmup", "0"]
    (r,) = measure_load(args, env=clean_env(VIBECTLD_BENCH_SECRET=secret)).values()
    if r.errors or not r.count:
        raise BenchError(f"the warm-up failed: {r.errors} errors, e.g. {r.error_samples}")


def paired_ratio(base: Sequence[object], other: Sequence[object], key: str) -> float:
    """The median over repeats of other[i].key / base[i].key (results of the same run)."""
    pairs = zip(base, other, strict=True)
    return median(getattr(o, key) / getattr(b, key) for b, o in pairs if getattr(b, key))


def paired_delta(base: Sequence[object], other: Sequence[object], key: str) -> float:
    """The median over repeats of other[i].key - base[i].key (results of the same run)."""
    pairs = [(getattr(b, key), getattr(o, key)) for b, o in zip(base, other, strict=True)]
    return median(o - b for b, o in pairs if b is not None and o is not None)


def head_to_head(callers: int, duration: float) -> list[str]:
    """bench.load's strategy for two targets measured in the same seconds: at 1 caller
    single calls alternate between them (paired), else the callers move between them
    every second (sliced); either way each target gets about `duration` of its own."""
    if callers == 1:
        return ["--strategy", "paired", "--duration", str(1.5 * duration)]
    return ["--strategy", "sliced", "--callers", str(callers), "--slice", "1",
            "--duration", str(2 * duration)]  # fmt: skip


def in_turn(rep: int, names: Sequence[str]) -> list[str]:
    """The targets in the order of repeat `rep`: reversed every other one, so neither goes
    first every time."""
    return list(names) if rep % 2 == 0 else list(names)[::-1]


@dataclass(frozen=True)
class Versus:
    """A figure measured against a baseline's in the same run, for a graded check: `who`
    and `base` name the two sides in its line ("vibectld p50", "raw")."""

    name: str  # the check's
    area: str  # the summary row's area and measure
    measure: str
    who: str
    base: str


def grade_ms_over(
    section: Section, vs: Versus, v: float, base: float, over: float, limit: float,
    spec: str = ".2f",
) -> bool:  # fmt: skip
    """Graded: `over` (ms, v - base, measured together) is at most `limit`."""
    ok = not math.isnan(over) and over <= limit
    target = f"<= +{limit:g} ms"
    a, b, d = format(v, spec), format(base, spec), format(over, "+" + spec)
    detail = f"{vs.who} {a} ms vs {vs.base} {b} ms: {d} ms (target {target})"
    section.graded(vs.name, ok, detail, (vs.area, vs.measure, f"{d} ms ({a} vs {b})", target))
    return ok


def grade_share(
    section: Section, vs: Versus, v: float, base: float, ratio: float, minimum: float
) -> bool:
    """Graded: `ratio` (v over base, req/s, measured together) is at least `minimum`."""
    ok = ratio >= minimum
    target = f">= {minimum:.0%}"
    detail = f"{vs.who} {v:.0f} req/s = {ratio:.0%} of {vs.base} {base:.0f} (target {target})"
    result = f"{ratio:.0%} ({v:.0f} vs {base:.0f})"
    section.graded(vs.name, ok, detail, (vs.area, vs.measure, result, target))
    return ok
