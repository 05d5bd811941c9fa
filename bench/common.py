"""What every section of the benchmark shares: the run context, measurements, results.

A section is a function `run(ctx) -> Section`: it starts the processes it needs (and
stops them), measures, and returns its tables, its target checks and the rows it
contributes to the summary table.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.servers import REPO, BenchError, Processes, clean_env

Result = dict[str, Any]  # one load generator's JSON result (bench.loadgen.Result)


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


def measure_load(
    module: str,
    args: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    budget: float = 120.0,
) -> Result:
    """One run of a load generator (`module` is bench.load or bench.provider_load)."""
    argv = [sys.executable, "-m", module, "--json", *args]
    try:
        out = subprocess.run(
            argv,
            cwd=REPO,
            env=env if env is not None else dict(os.environ),
            capture_output=True,
            text=True,
            timeout=budget,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BenchError(f"{module} did not finish within {budget:.0f} s") from None
    return parse_result(module, out.returncode, out.stdout, out.stderr)


def parse_result(module: str, returncode: int | None, stdout: str, stderr: str) -> Result:
    lines = stdout.strip().splitlines()
    try:
        result: Result = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise BenchError(f"{module} failed (exit {returncode}): {stderr.strip()[-2000:]}") from None
    return result


def start_load(module: str, args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """A load generator running in the background; finish it with `finish_load`."""
    argv = [sys.executable, "-m", module, "--json", *args]
    return subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish_load(module: str, proc: subprocess.Popen[str], budget: float) -> Result:
    try:
        stdout, stderr = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise BenchError(f"{module} did not finish within {budget:.0f} s") from None
    return parse_result(module, proc.returncode, stdout, stderr)


def median(results: Sequence[Result], key: str) -> float:
    """The median of a key over results (NaN when none has it)."""
    values = [float(r[key]) for r in results if r.get(key) is not None]
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def total(results: Sequence[Result], key: str) -> int:
    return sum(int(r.get(key) or 0) for r in results)


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
        f"{name}: {r['rps']:8.1f} req/s  p50 {fmt(r['p50_ms'], '.3f')} ms  "
        f"p99 {fmt(r['p99_ms'], '.3f')} ms"
    )
    if r.get("ttfc_p50_ms") is not None:
        text += f"  first text p50 {fmt(r['ttfc_p50_ms'], '.3f')} ms"
    text += f"  errors {r['errors']}"
    if r.get("refused"):
        text += f"  refused {r['refused']}"
    return text


def check_errors(section: Section, name: str, r: Result, *, refusals_ok: bool = False) -> None:
    """Record a measurement that saw errors (or, unless expected, refusals) or no success."""
    refused = 0 if refusals_ok else int(r.get("refused") or 0)
    if r["errors"] or refused or not (r["count"] or (refusals_ok and r.get("refused"))):
        section.failures.append(
            f"{name}: {r['errors']} errors, {refused} refused, {r['count']} ok; "
            f"e.g. {r['error_samples'][:2]}"
        )


def timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def warm_up(ctx: Context, port: int, ca: Path, secret: str, model: str = "echo") -> None:
    """A short unmeasured load on a freshly started daemon (first calls are slower)."""
    calls = 100 if ctx.settings.quick else 500
    args = ["--port", str(port), "--ca", str(ca), "--callers", "16", "--model", model]
    args += ["--max-requests", str(calls), "--duration", "60", "--warmup", "0"]
    args += ["--label", "warm-up"]
    r = measure_load("bench.load", args, env=clean_env(VIBECTLD_BENCH_SECRET=secret))
    if r["errors"] or not r["count"]:
        raise BenchError(f"the warm-up failed: {r['errors']} errors, e.g. {r['error_samples']}")


def paired_ratio(base: Sequence[Result], other: Sequence[Result], key: str) -> float:
    """The median over repeats of other[i][key] / base[i][key] (results of the same run)."""
    ratios = [
        float(o[key]) / float(b[key])
        for b, o in zip(base, other, strict=True)
        if b.get(key) and o.get(key) is not None
    ]
    return statistics.median(ratios) if ratios else math.nan


def paired_delta(base: Sequence[Result], other: Sequence[Result], key: str) -> float:
    """The median over repeats of other[i][key] - base[i][key] (results of the same run)."""
    deltas = [
        float(o[key]) - float(b[key])
        for b, o in zip(base, other, strict=True)
        if b.get(key) is not None and o.get(key) is not None
    ]
    return statistics.median(deltas) if deltas else math.nan
