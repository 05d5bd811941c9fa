"""The README's first command ends in this script; it must keep working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "the server's CA matches the pin" in out.stdout
    assert "[complete]" in out.stdout and "[final_metrics]" in out.stdout
    assert "refused: UNAUTHENTICATED: secret was revoked" in out.stdout
    assert "demo-user  revoked" in out.stdout
    assert "profile 'demo' saved and active" in out.stdout
    assert '"prompt": "why is my pod in CrashLoopBackOff?"' in out.stdout
    assert "vibectl exit 4:" in out.stdout
