"""The streaming bench sums the daemon's CPU and RSS over its process tree (with
server.workers > 1 the serving processes are the main process's children)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench.servers import rss_kib
from bench.streams import process_tree, tree_cpu_seconds, tree_rss_kib

# A parent that starts a child which burns CPU, and both wait to be killed.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time\\nt = time.process_time()\\n"
                          "while time.process_time() - t < 0.3: pass\\nprint('spun', flush=True)"
                          "\\ntime.sleep(60)"], stdout=sys.stdout)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_child_is_in_the_tree_and_its_cpu_and_rss_are_summed() -> None:
    child = 0
    with subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            assert parent.stdout.readline().strip() == "spun"
            tree = process_tree(parent.pid)
            assert set(tree) == {parent.pid, child}
            cpu = tree_cpu_seconds(parent.pid)
            assert cpu is not None and cpu >= 0.3  # the child's spin is counted
            assert tree_rss_kib(parent.pid) >= rss_kib(parent.pid) + rss_kib(child)
        finally:
            if child:
                os.kill(child, signal.SIGKILL)
            parent.kill()
    time.sleep(0.05)
    assert tree_cpu_seconds(parent.pid) is None  # gone: nothing to read


def test_a_process_without_children_is_its_own_tree() -> None:
    # Read once it has started and is asleep: during start-up its RSS still grows, and
    # the two reads below would see two sizes.
    script = "import time; print('ready', flush=True); time.sleep(60)"
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            assert process_tree(proc.pid) == [proc.pid]
            assert tree_rss_kib(proc.pid) == rss_kib(proc.pid)
        finally:
            proc.kill()
