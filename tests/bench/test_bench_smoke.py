"""The benchmark runs end to end (a smoke test: timings are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_quick_bench_runs_and_prints_the_table() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-write"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "| mode | callers | floor req/s | vibectld req/s | ratio |" in out.stdout
    assert "| unary | 16 |" in out.stdout
    assert "| streaming | 1 |" in out.stdout
