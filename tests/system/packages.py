"""The packages under test: dist/vibectld_<ver>_<arch>.deb and
dist/vibectld-<ver>-1.<arch>.rpm, built with `make packages` when dist/ has none
that are newer than every source they are made from."""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DIST = REPO / "dist"
# What goes into the server packages; a file here newer than a package makes it stale.
SOURCES = (
    "vibectld",
    "vibectl",
    "systemd",
    "packaging",
    "man",
    "pyproject.toml",
    "scripts/build-packages",
)
BUILD_TIMEOUT = 1800


@dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path


def version() -> str:
    text = (REPO / "vibectld" / "version.py").read_text()
    match = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    if not match:
        raise RuntimeError("no __version__ in vibectld/version.py")
    return match.group(1)


def expected() -> Packages:
    deb_arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
    rpm_arch = os.uname().machine
    ver = version()
    return Packages(
        deb=DIST / f"vibectld_{ver}_{deb_arch}.deb",
        rpm=DIST / f"vibectld-{ver}-1.{rpm_arch}.rpm",
    )


def build_recipe() -> list[str] | None:
    """The command that builds the packages, or None while the packaging does not exist."""
    makefile = REPO / "Makefile"
    if makefile.exists() and re.search(r"^packages\s*:", makefile.read_text(), re.M):
        return ["make", "-C", str(REPO), "packages"]
    script = REPO / "scripts" / "build-packages"
    if script.exists():
        return [str(script)]
    return None


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        top = REPO / name
        if top.is_file():
            newest = max(newest, top.stat().st_mtime)
        elif top.is_dir():
            for dirpath, dirnames, filenames in os.walk(top):
                dirnames[:] = [d for d in dirnames if d not in ("__pycache__", ".mypy_cache")]
                for f in filenames:
                    if not f.endswith((".pyc", ".pyo")):
                        newest = max(newest, os.stat(os.path.join(dirpath, f)).st_mtime)
    return newest


def current(pkgs: Packages) -> bool:
    if not (pkgs.deb.exists() and pkgs.rpm.exists()):
        return False
    if os.environ.get("VIBECTLD_SYSTEST_REUSE_PACKAGES"):
        return True  # a developer iterating on the test itself: take dist/ as it is
    built = min(pkgs.deb.stat().st_mtime, pkgs.rpm.stat().st_mtime)
    return built >= _newest_source_mtime()


def ensure(log: Path) -> Packages:
    """Current packages in dist/, built first if missing or older than their sources."""
    pkgs = expected()
    recipe = build_recipe()
    if current(pkgs):
        return pkgs
    if recipe is None:
        raise FileNotFoundError("no `make packages` target and no scripts/build-packages yet")
    DIST.mkdir(exist_ok=True)
    with (DIST / ".systest-build.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if current(pkgs):
            return pkgs
        started = time.monotonic()
        print(f"building packages: {' '.join(recipe)} (log: {log})", file=sys.stderr)
        with log.open("w") as out:
            try:
                subprocess.run(
                    recipe,
                    cwd=REPO,
                    check=True,
                    timeout=BUILD_TIMEOUT,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
                raise RuntimeError(f"building the packages failed: {e}\n{tail}") from None
        print(f"built packages in {time.monotonic() - started:.0f}s", file=sys.stderr)
    for path in (pkgs.deb, pkgs.rpm):
        if not path.exists():
            found = sorted(p.name for p in DIST.glob("*"))
            raise FileNotFoundError(f"{' '.join(recipe)} did not make {path}; dist/ has {found}")
    return pkgs
