"""vibectl-admin must import nothing of the daemon beyond the admin protocol and client."""

from __future__ import annotations

import subprocess
import sys

ALLOWED = {
    "vibectld",
    "vibectld.admin",
    "vibectld.admin.protocol",
    "vibectld.admin.client",
    "vibectld.admin.cli",
    "vibectld.version",
}


def test_admin_cli_imports_only_protocol_client_and_version() -> None:
    code = (
        "import vibectld.admin.cli, sys; "
        "print('\\n'.join(m for m in sys.modules if m.startswith('vibectld')))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    imported = set(proc.stdout.split())
    assert "vibectld.admin.cli" in imported
    # The CLI's own package (its command modules) is the CLI.
    outside = {m for m in imported - ALLOWED if not m.startswith("vibectld.admin.cli.")}
    assert not outside, sorted(outside)
