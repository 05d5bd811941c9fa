"""The benchmark runs end to end (a smoke test: timings are not asserted).

`python -m bench.run --quick --no-write` goes through every section (vibectld, the
floor, the fake provider, a populated registry, READY=1, `vibectl ask` in both modes,
an abusive client, concurrent paced streams and readers that never read, three nodes on
a PostgreSQL of its own) in about two minutes, and must finish without a measurement
error. Whether the targets are met is the benchmark's report, not this test's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
SECTIONS = (
    "Overhead vs the floor",
    "The real provider path",
    "Scale of the registry",
    "Footprint",
    "Isolation",
    "Redaction",
    "Streaming at scale",
    "Several nodes on PostgreSQL",
)


def _results_files() -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in RESULTS.glob("*.md")}


@pytest.mark.timeout(360)
def test_quick_bench_runs_every_section_and_prints_the_tables() -> None:
    before = _results_files()
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--no-write"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=320,
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    for title in SECTIONS:
        assert f"## {title}" in out.stdout, title
    # Overhead: vibectld against the floor, both modes.
    assert "| mode | callers | floor req/s | vibectld req/s | ratio |" in out.stdout
    assert "| unary | 16 |" in out.stdout
    assert "| streaming | 1 |" in out.stdout
    assert "time to first chunk (streaming, 1 caller)" in out.stdout
    # Provider: the raw client, llm in-process and vibectld, each measured.
    for path in ("raw", "llm-pooled", "vibectld"):
        assert re.search(rf"^\| {path} \| unary \| 16 \| [1-9]", out.stdout, re.M), path
    assert "provider time to first token (streaming, 1 caller)" in out.stdout
    # Registry, footprint, isolation: their checks ran.
    assert "registry scale (unary, 16 callers)" in out.stdout
    assert "memory growth" in out.stdout
    assert "| `vibectl ask` proxy mode |" in out.stdout
    assert "isolation (abuser at 10x its rpm)" in out.stdout
    assert "redaction client, 10 kB typical prompt" in out.stdout
    # Streaming: vibectld beside the raw SSE client on the paced provider, and slow readers.
    for path in ("raw", "vibectld"):
        assert re.search(rf"^\| 50 \| {path} \| [1-9]", out.stdout, re.M), path
    assert "vibectld CPU per relayed chunk" in out.stdout
    assert "clients that never read" in out.stdout
    _cluster_section_measured_each_part(out.stdout)
    # Every target shows a verdict, and the summary closes the run.
    assert "=== Summary ===" in out.stdout
    assert re.search(r"^\d+ of \d+ targets met", out.stdout, re.M)
    assert "ERROR" not in out.stdout
    # --no-write (and --quick) leave the results alone.
    assert _results_files() == before


def _cluster_section_measured_each_part(stdout: str) -> None:
    """Several nodes on PostgreSQL: the provider path and echo against SQLite (each for a
    client without and with limits), the statements per call, revocation across nodes."""
    assert re.search(r"^\| vibectld on PostgreSQL \| 16 \| [1-9]", stdout, re.M)
    limited = r"^\| vibectld on PostgreSQL, client with rpm \+ concurrency limits \| 1 \| [1-9]"
    assert re.search(limited, stdout, re.M)
    for client in ("no limits", "limits"):
        row = rf"^\| {client} \| 16 \| [1-9]\d* \| [1-9]\d* \| \d+% \|"
        assert re.search(row, stdout, re.M), client
    for check in (
        "PostgreSQL node, provider latency (unary, 1 caller)",
        "PostgreSQL node, provider throughput (unary, 16 callers)",
        "PostgreSQL node, echo throughput (16 callers) vs SQLite",
        "revocation propagation across nodes (under load)",
    ):
        assert re.search(rf"^- (PASS|FAIL)  {re.escape(check)}:", stdout, re.M), check
    assert "| statement | why | when | quiet: per s |" in stdout
    assert "`SELECT retry_ms, running FROM vibectld_admit(" in stdout
    for client in ("no limits", "rpm + concurrency"):
        assert f"database statements per call, client with {client}:" in stdout
    # B and C each probed in every trial (8 with --quick).
    for node in ("node-b", "node-c"):
        assert re.search(rf"^\| {node} \| 8 \|", stdout, re.M), node
    # The connection string's password is never printed.
    assert "password=" not in stdout


def test_only_rejects_an_unknown_section() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "overhead,nope", "--no-write"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert "unknown section(s) nope" in out.stderr
    assert "overhead, provider, registry, footprint, isolation" in out.stderr
