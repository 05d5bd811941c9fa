"""The results file, the README summary table, and the machine they were measured on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata

from bench.common import Section, SummaryRow, md_table
from bench.servers import REPO

SUMMARY_HEADER = ("area", "measure", "result", "target", "verdict")


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


def _loadavg() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "unknown"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


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
        "llm": version("llm"),
        "openai": version("openai"),
        "aiohttp": version("aiohttp"),
        "vibectld": version("vibectld"),
        "commit": _git_commit(),
        "load average (1/5/15 min) at the end": _loadavg(),
    }


def summary_table(sections: Sequence[Section]) -> str:
    rows: list[SummaryRow] = [row for s in sections for row in s.summary]
    return md_table(
        SUMMARY_HEADER, [[r.area, r.measure, r.result, r.target, r.verdict] for r in rows]
    )


def markdown(
    date: str,
    settings: str,
    sections: Sequence[Section],
    info: dict[str, str],
    seconds: float,
) -> str:
    machine = "\n".join(f"- {k}: {v}" for k, v in info.items())
    body = "\n\n".join(s.text() for s in sections)
    return f"""# vibectld benchmark, {date}

`make bench` (`python -m bench.run`): load from separate processes on loopback, TLS and
secret auth on, on this machine. Each figure is the median of the repeats; every ratio
compares measurements taken in the same run, interleaved (calls alternating between the
two servers at 1 caller, the callers moving between them every second at 16 and 64, an
abuser switching on and off every second), so the machine's drift hits both sides alike.
Latencies are per request.

Settings: {settings}; the whole run took {seconds / 60:.1f} min.

## Summary

{summary_table(sections)}

{body}

## Machine

{machine}
"""


def summary_markdown(date: str, sections: Sequence[Section]) -> str:
    return f"""<!-- written by `make bench` (bench/run.py); paste into the README -->
Measured {date} on a 2-core machine (`bench/results/{date}.md` has every number):

{summary_table(sections)}
"""
