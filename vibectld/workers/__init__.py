"""Serving processes on every core: `server.workers: N | auto`.

With one worker (the default on a one-CPU machine) vibectld is one process, exactly
as without this package. With more, the main process (supervisor.py) keeps everything
that must be decided in one place (store, limits, budgets, usage, admin socket,
notification, reloads) and N worker processes (worker.py) serve gRPC on the same port
with SO_REUSEPORT, each asking the main process over a private channel (channel.py)
what a single process would have decided alone (view.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from vibectld.config import DaemonConfig

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cpu_max() -> str:
    """This process's cgroup v2 cpu.max ("max 100000" or "150000 100000"); OSError."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return (_CGROUP_ROOT / line[3:].lstrip("/") / "cpu.max").read_text()
    raise OSError("no cgroup v2")


def usable_cpus() -> int:
    """The CPUs this process may run on, capped by a cgroup v2 CPU quota if one is set
    (systemd's CPUQuota=, a container's --cpus): a quota of 150% is 2 workers."""
    count = len(os.sched_getaffinity(0))
    try:
        quota, period = _cpu_max().split()[:2]
    except (OSError, ValueError):
        return count
    if quota == "max":
        return count
    try:
        share = -(-int(quota) // int(period))  # rounded up: part of a core is worth one
    except (ValueError, ZeroDivisionError):
        return count
    return max(1, min(count, share))


def worker_count(config: DaemonConfig) -> int:
    """`server.workers`, with `auto` resolved to the usable CPUs."""
    workers = config.server.workers
    return usable_cpus() if workers == "auto" else workers
