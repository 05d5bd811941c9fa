"""A cached Debian 12 root filesystem for the system test, made with debootstrap.

The cache lives outside the repository (``/var/cache/vibectld-systest`` unless
``VIBECTLD_SYSTEST_CACHE`` says otherwise) as a plain directory named after
``ROOTFS_VERSION``; bump that string whenever the recipe below changes and the
next run rebuilds it. A build goes into a temporary directory that is renamed
into place only once it is complete, under a lock, so a half-made or concurrent
build is never used. Tests never touch the cache: each boots a fresh copy.

Run ``scripts/system-rootfs`` (``python -m tests.system.rootfs``) to build it
ahead of time, ``--rebuild`` to force a new one.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SUITE = "bookworm"
# Bump when anything in the recipe (packages, tweaks) changes.
ROOTFS_VERSION = "bookworm-v1"
# systemd and dbus to boot; python3.11 because the .deb depends on it (its
# /opt/vibectld virtualenv runs on /usr/bin/python3.11); rpm to install the .rpm;
# adduser and passwd because maintainer scripts commonly need them.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3.11", "rpm", "adduser", "passwd")
# Timers and services that would only add noise (or reach out) during a test.
MASKED_UNITS = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-timesyncd.service",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEBOOTSTRAP_TIMEOUT = 1800


def cache_dir() -> Path:
    return Path(os.environ.get("VIBECTLD_SYSTEST_CACHE", "/var/cache/vibectld-systest"))


def rootfs_path() -> Path:
    return cache_dir() / ROOTFS_VERSION


def _sources_entries() -> Iterator[tuple[str, list[str], list[str]]]:
    """(uri, suites, components) of every apt source on this machine."""
    paths = [Path("/etc/apt/sources.list")]
    parts = Path("/etc/apt/sources.list.d")
    if parts.is_dir():
        paths += sorted(parts.iterdir())
    for path in paths:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line:
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                suites = fields.get("suites", "").split()
                components = fields.get("components", "").split()
                for uri in fields.get("uris", "").split():
                    yield uri, suites, components
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    yield words[1], [words[2]], words[3:]


def mirror() -> str:
    """The Debian mirror this machine's apt uses for bookworm main (so debootstrap
    fetches from a source known to be reachable), unless VIBECTLD_SYSTEST_MIRROR is set."""
    override = os.environ.get("VIBECTLD_SYSTEST_MIRROR")
    if override:
        return override
    for uri, suites, components in _sources_entries():
        if SUITE in suites and "main" in components and "security" not in uri:
            return uri.rstrip("/")
    return DEFAULT_MIRROR


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(cmd: list[str], timeout: float, log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        try:
            subprocess.run(
                cmd,
                check=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            raise RuntimeError(f"{e}\n--- last lines of {log} ---\n{tail}") from None


def _customize(root: Path) -> None:
    (root / "etc/hostname").write_text("systest\n")
    (root / "etc/hosts").write_text("127.0.0.1\tlocalhost systest\n::1\tlocalhost ip6-localhost\n")
    # Empty: systemd makes a fresh machine id on every boot of every copy.
    (root / "etc/machine-id").write_text("")
    for unit in MASKED_UNITS:
        link = root / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # No package lists: the container installs only local files, offline.
    lists = root / "var/lib/apt/lists"
    for entry in lists.glob("*"):
        if entry.is_file():
            entry.unlink()
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root / "etc/vibectld-systest-rootfs").write_text(f"{ROOTFS_VERSION}\n")


def build(target: Path, log: Path) -> None:
    """debootstrap a fresh root filesystem into `target` (which must not exist)."""
    url = mirror()
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(PACKAGES)}",
            SUITE,
            str(target),
            url,
        ],
        DEBOOTSTRAP_TIMEOUT,
        log,
    )
    # rpm keeps its database under /var/lib/rpm; create it now so `rpm -i` needs nothing.
    _run(["chroot", str(target), "rpm", "--initdb"], 120, log)
    _customize(target)


def ensure(rebuild: bool = False, quiet: bool = False) -> Path:
    """The cached root filesystem, built first if it is missing (or `rebuild`)."""
    path = rootfs_path()
    if path.is_dir() and not rebuild:
        return path
    with _locked(cache_dir() / ".lock"):
        if path.is_dir() and not rebuild:
            return path  # another process built it while we waited
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log = cache_dir() / f"{ROOTFS_VERSION}.log"
        log.write_text("")
        started = time.monotonic()
        if not quiet:
            print(f"building {path} from {mirror()} (log: {log})", file=sys.stderr)
        try:
            build(tmp, log)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
        # Older recipes are dead weight.
        for old in cache_dir().glob(f"{SUITE}-*"):
            if old.is_dir() and old.name not in (path.name,):
                shutil.rmtree(old, ignore_errors=True)
        if not quiet:
            print(f"built {path} in {time.monotonic() - started:.0f}s", file=sys.stderr)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rebuild", action="store_true", help="build a new one even if cached")
    args = parser.parse_args()
    print(ensure(rebuild=args.rebuild))
    return 0


if __name__ == "__main__":
    sys.exit(main())
