"""The cluster section runs end to end (a smoke test: timings are not asserted).

`python -m bench.run --only cluster --quick --no-write` starts its own PostgreSQL 15,
a fake provider, a node on SQLite and three on PostgreSQL, and must finish without a
measurement error, with every table and check printed. Whether the targets are met is
the benchmark's report, not this test's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.postgres import PG_BIN

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not (PG_BIN / "initdb").exists(), reason="PostgreSQL 15 is not installed (scripts/system-deps)"
)
def test_quick_cluster_section_measures_each_part() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.run", "--only", "cluster", "--quick", "--no-write"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "## Several nodes on PostgreSQL" in out.stdout
    # The provider path and echo against SQLite, each side measured without errors.
    assert re.search(r"^\| vibectld on PostgreSQL \| 16 \| [1-9]", out.stdout, re.M), text
    assert re.search(
        r"^\| vibectld on PostgreSQL, client with rpm \+ concurrency limits \| 1 \| [1-9]",
        out.stdout,
        re.M,
    ), text
    for client in ("no limits", "limits"):
        row = rf"^\| {client} \| 16 \| [1-9]\d* \| [1-9]\d* \| \d+% \|"
        assert re.search(row, out.stdout, re.M), client
    for check in (
        "PostgreSQL node, provider latency (unary, 1 caller)",
        "PostgreSQL node, provider throughput (unary, 16 callers)",
        "PostgreSQL node, echo throughput (16 callers) vs SQLite",
    ):
        assert re.search(rf"^- (PASS|FAIL)  {re.escape(check)}:", out.stdout, re.M), check
    # Statements per call: the table and one line per kind of client.
    assert "| statement | why | when | quiet: per s |" in out.stdout
    assert "`SELECT vibectld_count_request(" in out.stdout
    assert "database statements per call, client with no limits:" in out.stdout
    assert "database statements per call, client with rpm + concurrency:" in out.stdout
    # Revocation across nodes: B and C each probed in every trial.
    assert re.search(r"^\| node-b \| 8 \|", out.stdout, re.M), text
    assert re.search(r"^\| node-c \| 8 \|", out.stdout, re.M), text
    assert re.search(
        r"^- (PASS|FAIL)  revocation propagation across nodes \(under load\): p50 ",
        out.stdout,
        re.M,
    ), text
    assert "ERROR" not in out.stdout
    # The connection string's password is never printed.
    assert "password=" not in text
