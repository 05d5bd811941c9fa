"""Fixtures for the system test: a cached Debian 12 root filesystem, the packages
from dist/, and booted containers that are always torn down.

The tests here need root, debootstrap and systemd-nspawn (Debian packages
`debootstrap` and `systemd-container`, installed by .ci/run). Without root they
are skipped; without the tools they are skipped too, except under CI (CI=true),
where a missing tool is a broken CI setup and fails instead.

Timings of the expensive phases are printed at the end of the run.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.postgres import postgres_server
from tests.system import packages, rootfs
from tests.system.container import Container

# The cluster test's containers share one PostgreSQL: the session's server (tests/postgres.py).
__all__ = ["postgres_server"]

TIMINGS: list[tuple[str, float]] = []
NOTES: list[str] = []
TOOLS = {
    "debootstrap": "debootstrap",
    "systemd-nspawn": "systemd-container",
    "nsenter": None,
    "setpriv": None,
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "system: boots Debian 12 under systemd-nspawn and tests the real packages"
    )


@contextmanager
def timed(phase: str) -> Iterator[None]:
    started = time.monotonic()
    try:
        yield
    finally:
        TIMINGS.append((phase, time.monotonic() - started))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if TIMINGS:
        terminalreporter.section("system test timings")
        for phase, seconds in TIMINGS:
            terminalreporter.write_line(f"{seconds:8.1f}s  {phase}")
    if NOTES:
        terminalreporter.section("system test results")
        for line in NOTES:
            terminalreporter.write_line(line)


def missing_prerequisite() -> str | None:
    if sys.platform != "linux":
        return "the system test boots a Linux container"
    if os.geteuid() != 0:
        return "the system test needs root (debootstrap, systemd-nspawn, nsenter)"
    for tool, package in TOOLS.items():
        if shutil.which(tool) is None:
            hint = f" (apt-get install {package})" if package else ""
            return f"{tool} is not installed{hint}"
    return None


def require_machine() -> None:
    reason = missing_prerequisite()
    if reason is None:
        return
    if os.environ.get("CI") and os.geteuid() == 0:
        pytest.fail(f"CI must run the system test, but {reason}: see .ci/run")
    pytest.skip(reason)


# Steps of one scenario depend on each other: once one fails, the rest of its class
# are reported as xfail naming the step that broke, instead of a cascade of failures.
_FAILED_STEP: dict[type, str] = {}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and item.get_closest_marker("system") is not None:
        cls = getattr(item, "cls", None)
        if cls is not None and call.when == "call":
            _FAILED_STEP.setdefault(cls, item.name)
        # Make CI failures diagnosable: the unit's status and journal from inside each
        # container the test used (one for the package tests, two for the cluster test).
        for name, box in getattr(item, "funcargs", {}).items():
            if isinstance(box, Container) and box.init_pid is not None:
                title = f"vibectld journal ({name})"
                try:
                    report.sections.append((title, box.journal("vibectld")))
                except Exception as e:
                    report.sections.append((title, f"unavailable: {e}"))
    return report


def pytest_runtest_setup(item: pytest.Item) -> None:
    cls = getattr(item, "cls", None)
    if cls is not None and cls in _FAILED_STEP:
        pytest.xfail(f"not run: the earlier step {_FAILED_STEP[cls]} failed")


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def cached_rootfs() -> Path:
    require_machine()
    with timed(f"root filesystem {rootfs.ROOTFS_VERSION} (cached or built)"):
        return rootfs.ensure()


@pytest.fixture(scope="session")
def built_packages(cached_rootfs: Path) -> packages.Packages:
    log = rootfs.cache_dir() / "build-packages.log"
    with timed("packages (current in dist/ or built)"):
        return packages.ensure(log)


@pytest.fixture(scope="session")
def echo_wheel(cached_rootfs: Path) -> Path:
    """A wheel of llm-echo (the keyless `echo` model), the version this venv has,
    downloaded once into the cache: the production package need not ship it."""
    ver = importlib.metadata.version("llm-echo")
    wheels = rootfs.cache_dir() / "wheels"
    found = sorted(wheels.glob(f"llm_echo-{ver}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheels),
                f"llm-echo=={ver}",
            ],
            check=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )
        found = sorted(wheels.glob(f"llm_echo-{ver}-*.whl"))
    assert found, f"pip download did not leave llm_echo-{ver}-*.whl in {wheels}"
    return found[-1]


@contextmanager
def booted(cached_rootfs: Path, label: str) -> Iterator[Container]:
    with timed(f"{label}: copy root filesystem and boot"):
        box = Container(cached_rootfs, label)
        box.__enter__()
    try:
        yield box
    finally:
        with timed(f"{label}: power off and remove the copy"):
            box.destroy()


@contextmanager
def booted_together(cached_rootfs: Path, labels: Sequence[str]) -> Iterator[list[Container]]:
    """Several containers, copied and booted in parallel (the copy and systemd's boot are
    mostly waiting, so two take little longer than one); all are always torn down."""
    boxes = [Container(cached_rootfs, label) for label in labels]
    names = " + ".join(labels)
    try:
        with timed(f"{names}: copy root filesystems and boot, in parallel"):
            in_parallel([box.copy_rootfs for box in boxes])
            # nspawn starts here, not in a worker thread: see Container.launch.
            for box in boxes:
                box.launch()
            in_parallel([box.wait_booted for box in boxes])
        yield boxes
    finally:
        # Timed apart: removing a copy with the package installed is most of the cost.
        with timed(f"{names}: power off, in parallel"):
            in_parallel([box.stop for box in boxes])
        with timed(f"{names}: remove the copies, in parallel"):
            in_parallel([box.destroy for box in boxes])


def in_parallel(steps: Sequence[Callable[[], object]]) -> list[object]:
    """Run each step in its own thread; their results in order, or the first error
    (after every step has finished, so nothing is left running behind a failure)."""
    with ThreadPoolExecutor(max_workers=len(steps)) as pool:
        futures = [pool.submit(step) for step in steps]
    return [future.result() for future in futures]
