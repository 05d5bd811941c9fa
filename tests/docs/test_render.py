"""Every man page renders without a single warning, with groff and with mandoc."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.docs.manpage import MAN_DIR, PAGES, groff, page_path


def test_man_dir_holds_exactly_the_pages() -> None:
    assert sorted(p.name for p in MAN_DIR.iterdir()) == sorted(PAGES)


@pytest.mark.parametrize("name", PAGES)
def test_groff_renders_without_warnings(name: str) -> None:
    proc = subprocess.run(
        [groff(), "-man", "-ww", "-z", "-Tutf8", str(page_path(name))],
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.parametrize("name", PAGES)
def test_mandoc_lint_is_clean(name: str) -> None:
    mandoc = shutil.which("mandoc")
    if mandoc is None:
        pytest.skip("mandoc is not installed (.ci/run installs the apt package mandoc)")
    proc = subprocess.run(
        [mandoc, "-Tlint", "-W", "warning", str(page_path(name))],
        capture_output=True,
        text=True,
        encoding="utf-8",
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


@pytest.mark.parametrize("name", PAGES)
def test_source_is_ascii(name: str) -> None:
    # groff reads raw UTF-8 as Latin-1 unless run through preconv; use \(em and friends.
    source = page_path(name).read_bytes()
    bad = [i + 1 for i, line in enumerate(source.splitlines()) if not line.isascii()]
    assert bad == [], f"non-ASCII bytes on lines {bad}"


@pytest.mark.parametrize("name", PAGES)
def test_title_matches_file_name(name: str) -> None:
    stem, _, section = name.rpartition(".")
    text = page_path(name).read_text(encoding="ascii")
    th = re.search(r"^\.TH (\S+) (\S+) ", text, re.MULTILINE)
    assert th is not None, "no .TH line"
    assert (th.group(1).replace("\\-", "-"), th.group(2)) == (stem.upper(), section)
    assert re.search(rf"^\.SH NAME\n{re.escape(stem.replace('-', chr(92) + '-'))} \\- ", text, re.M)
