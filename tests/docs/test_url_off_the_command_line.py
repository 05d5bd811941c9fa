"""No page tells a user to put a connection URL, and so its secret, on a command line.

`vibectl setup-proxy configure -` reads the URL from standard input (without echo on a
terminal), so the secret appears neither in `ps` nor in the shell's history (issue 12,
item 5). The README and every man page give that form whenever they tell someone what
to run; vibectl(1)'s synopsis still documents the URL argument, as a choice, not advice.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.docs.manpage import PAGES, Page

README = Path(__file__).resolve().parents[2] / "README.md"
# "configure URL", "configure <URL>", "configure '<URL>'", "configure "$URL"", ...
_URL_AS_ARGUMENT = re.compile(r"setup-proxy configure ['\"]?(<?URL>?|\$\w*URL\w*)\b", re.I)


@pytest.mark.parametrize("name", PAGES)
def test_man_pages_give_the_stdin_form(name: str) -> None:
    text = " ".join(Page.load(name).text.split())
    assert not _URL_AS_ARGUMENT.search(text), _URL_AS_ARGUMENT.search(text)


def test_the_readme_gives_the_stdin_form() -> None:
    text = README.read_text()
    assert not _URL_AS_ARGUMENT.search(text), _URL_AS_ARGUMENT.search(text)
    first = re.search(r"vibectl setup-proxy configure \S*", text)
    assert first is not None and first.group(0) == "vibectl setup-proxy configure -"
