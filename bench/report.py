"""Aggregating measurements, checking the targets, and formatting the report."""

from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from bench.servers import REPO

# The targets vibectld is held to.
MIN_RPS_RATIO = 0.60  # of the floor's req/s, at THROUGHPUT_CALLERS callers
THROUGHPUT_CALLERS = 16
MAX_P50_DELTA_MS = 0.35  # over the floor's p50, at LATENCY_CALLERS caller
LATENCY_CALLERS = 1

MODE_LABEL = {"unary": "unary", "stream": "streaming"}
HEADER = (
    "| mode | callers | floor req/s | vibectld req/s | ratio | floor p50/p99 ms "
    "| vibectld p50/p99 ms | p50 delta ms | first chunk p50 ms floor/vibectld "
    "| server CPU us/req floor/vibectld | errors |"
)


@dataclass(frozen=True)
class Cell:
    """The median over repeats of one server's measurements in one configuration."""

    rps: float
    p50_ms: float
    p99_ms: float
    ttfc_p50_ms: float | None
    cpu_us_per_req: float | None
    errors: int
    client_cpu_util: float

    @classmethod
    def median_of(cls, results: list[dict[str, Any]]) -> Cell:
        def med(key: str) -> float | None:
            values = [r[key] for r in results if r.get(key) is not None]
            return statistics.median(values) if values else None

        def req(key: str) -> float:
            value = med(key)
            return math.nan if value is None else value

        return cls(
            rps=req("rps"),
            p50_ms=req("p50_ms"),
            p99_ms=req("p99_ms"),
            ttfc_p50_ms=med("ttfc_p50_ms"),
            cpu_us_per_req=med("server_cpu_us_per_req"),
            errors=sum(int(r["errors"]) for r in results),
            client_cpu_util=req("client_cpu_util"),
        )


@dataclass(frozen=True)
class Row:
    mode: str
    callers: int
    floor: Cell
    vibectld: Cell

    @property
    def ratio(self) -> float:
        return self.vibectld.rps / self.floor.rps if self.floor.rps else math.nan

    @property
    def p50_delta_ms(self) -> float:
        return self.vibectld.p50_ms - self.floor.p50_ms


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.name}: {self.detail}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def table(rows: list[Row]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for r in rows:
        f, v = r.floor, r.vibectld
        ttfc = (
            f"{_opt(f.ttfc_p50_ms, '.3f')} / {_opt(v.ttfc_p50_ms, '.3f')}"
            if r.mode == "stream"
            else "-"
        )
        cells = [
            MODE_LABEL[r.mode],
            str(r.callers),
            f"{f.rps:.0f}",
            f"{v.rps:.0f}",
            f"{r.ratio:.0%}",
            f"{f.p50_ms:.3f} / {f.p99_ms:.3f}",
            f"{v.p50_ms:.3f} / {v.p99_ms:.3f}",
            f"{r.p50_delta_ms:+.3f}",
            ttfc,
            f"{_opt(f.cpu_us_per_req, '.0f')} / {_opt(v.cpu_us_per_req, '.0f')}",
            f"{f.errors} / {v.errors}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checks(rows: list[Row]) -> list[Check]:
    out: list[Check] = []
    for r in rows:
        label = f"{MODE_LABEL[r.mode]}, {r.callers} caller{'s' if r.callers > 1 else ''}"
        if r.callers == THROUGHPUT_CALLERS:
            out.append(
                Check(
                    f"throughput ({label})",
                    r.ratio >= MIN_RPS_RATIO,
                    f"vibectld {r.vibectld.rps:.0f} req/s = {r.ratio:.0%} of the floor's "
                    f"{r.floor.rps:.0f} (target >= {MIN_RPS_RATIO:.0%})",
                )
            )
        if r.callers == LATENCY_CALLERS:
            out.append(
                Check(
                    f"latency ({label})",
                    r.p50_delta_ms <= MAX_P50_DELTA_MS,
                    f"vibectld p50 {r.vibectld.p50_ms:.3f} ms = floor "
                    f"{r.floor.p50_ms:.3f} ms {r.p50_delta_ms:+.3f} ms "
                    f"(target <= +{MAX_P50_DELTA_MS} ms)",
                )
            )
    return out


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine_info() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "grpcio": version("grpcio"),
        "vibectld": version("vibectld"),
        "commit": _git_commit(),
    }


def markdown(
    date: str, settings: str, rows: list[Row], results: list[Check], info: dict[str, str]
) -> str:
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    verdicts = "\n".join(f"- {c.line()}" for c in results)
    return f"""# vibectld benchmark, {date}

Closed-loop load from a separate process (`bench/load.py`) against vibectld (`echo`
model, JSON logs at level info to a file, no limits) and against a bare grpc.aio
server with canned replies and the same TLS certificate (`bench/floor_server.py`).
Each number is the median of the repeats; latencies are per request, in ms.

Settings: {settings}

{table(rows)}

## Targets

{verdicts}

## Machine

{machine}
"""
