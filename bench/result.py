"""What a load generator measures, and the one median the benchmark reports.

`Samples` collects one target's calls as they complete; `summarize` turns them into a
`Result`, the one result type: bench.load prints it as JSON and the sections read it
back (`Result.from_json`) to build their tables.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


class CallFailed(Exception):
    """A call did not succeed; `kind` is "refused" (a limit said no) or "error"."""

    def __init__(self, kind: str, what: str) -> None:
        super().__init__(what)
        self.kind = kind
        self.what = what


@dataclass
class Samples:
    """One target's calls: the counted ones' latencies, and what failed."""

    latencies: list[float] = field(default_factory=list)
    ttfc: list[float] = field(default_factory=list)
    # With keep_samples: (wall-clock start, latency) of each counted call.
    timeline: list[tuple[float, float]] = field(default_factory=list)
    started: int = 0
    errors: int = 0
    refused: int = 0
    refused_in_window: int = 0
    error_samples: list[str] = field(default_factory=list)

    def failed(self, e: CallFailed, in_window: bool = False) -> None:
        if e.kind == "refused":
            self.refused += 1
            self.refused_in_window += in_window
            return
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(e.what[:300])

    def counted(self, latency: float, ttfc: float, stream: bool, wall: float | None) -> None:
        """A call that completed inside the window: it is part of the sample."""
        self.latencies.append(latency)
        if stream:
            self.ttfc.append(ttfc)
        if wall is not None:
            self.timeline.append((wall, latency))


@dataclass
class Result:
    label: str
    mode: str
    callers: int
    rate: float | None
    window_s: float
    count: int
    errors: int
    refused: int
    refused_per_s: float  # refusals of calls started in the measurement window
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    ttfc_p50_ms: float | None
    ttfc_p99_ms: float | None
    client_cpu_util: float
    client_cpu_us_per_req: float | None
    server_cpu_us_per_req: float | None
    error_samples: list[str]
    burst_s: float = 0.0
    # With keep_samples: [wall-clock start s, latency ms] of each counted call.
    samples: list[list[float]] | None = None
    # With a duty cycle: the wall-clock [start, end] of each sending period.
    on_windows: list[list[float]] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        return cls(**data)

    def line(self) -> str:
        shape = f"rate={self.rate:g}/s" if self.rate else f"callers={self.callers}"
        text = (
            f"{self.label} {self.mode} {shape}: {self.count} ok in {self.window_s:.2f}s = "
            f"{self.rps:.0f} req/s, p50 {self.p50_ms:.3f} ms, p99 {self.p99_ms:.3f} ms"
        )
        if self.ttfc_p50_ms is not None:
            text += f", first text p50 {self.ttfc_p50_ms:.3f} ms"
        text += f", errors {self.errors}, refused {self.refused}"
        text += f", client cpu {self.client_cpu_util:.0%}"
        if self.server_cpu_us_per_req is not None:
            text += f", server cpu {self.server_cpu_us_per_req:.0f} us/req"
        return text


def median(values: Iterable[float | None]) -> float:
    """The median of the numbers given, None and NaN left out; NaN when none is left."""
    kept = [float(v) for v in values if v is not None and not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(
    label: str,
    mode: str,
    callers: int,
    samples: Samples,
    window_s: float,
    *,
    client_cpu_s: float | None = None,
    server_cpu_s: float | None = None,
    rate: float | None = None,
    rps: float | None = None,
    burst_s: float = 0.0,
    keep_samples: bool = False,
) -> Result:
    """A Result from samples: CPU seconds are those spent during the window."""
    count = len(samples.latencies)
    ms = [x * 1000 for x in samples.latencies]
    ttfc = [x * 1000 for x in samples.ttfc]
    stream = mode == "stream"
    return Result(
        label,
        mode,
        callers,
        rate,
        window_s,
        count,
        samples.errors,
        samples.refused,
        refused_per_s=samples.refused_in_window / window_s,
        rps=count / window_s if rps is None else rps,
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=max(ms) if ms else float("nan"),
        ttfc_p50_ms=percentile(ttfc, 50) if stream else None,
        ttfc_p99_ms=percentile(ttfc, 99) if stream else None,
        client_cpu_util=(client_cpu_s or 0.0) / window_s,
        client_cpu_us_per_req=client_cpu_s / count * 1e6 if client_cpu_s and count else None,
        server_cpu_us_per_req=server_cpu_s / count * 1e6
        if server_cpu_s is not None and count
        else None,
        error_samples=samples.error_samples,
        burst_s=burst_s,
        samples=[[t, x * 1000] for t, x in samples.timeline] if keep_samples else None,
    )
