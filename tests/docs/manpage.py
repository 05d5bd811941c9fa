"""Man pages rendered to plain text, and the pieces of them the drift tests read.

Pages are rendered with groff rather than read as roff source, so escapes such
as ``\\-`` and font changes cannot hide a flag or a key from the tests. The line
length is huge and hyphenation is off, so every filled paragraph is one line and
no word is ever split.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

MAN_DIR = Path(__file__).resolve().parents[2] / "man"
PAGES = ("vibectld.8", "vibectl-admin.8", "vibectld.yaml.5", "vibectl.1")

# Indentation of rendered man(7) output: sections at 0, subsections at 3,
# paragraphs and tags at 7, tagged bodies at 14.
_SUBSECTION = re.compile(r"^ {3}(\S.*)$")
_TAG = re.compile(r"^ {7}(\S.*)$")
# Hyphens and minus signs groff may emit for "-" and "\-" on a UTF-8 device.
_DASHES = str.maketrans({"\u2010": "-", "\u2011": "-", "\u2212": "-"})


def groff() -> str:
    path = shutil.which("groff")
    if path is None:
        raise AssertionError("groff is not installed; install it with: apt-get install groff-base")
    return path


def page_path(name: str) -> Path:
    return MAN_DIR / name


@cache
def render(name: str) -> str:
    """The page as plain text: no overstrike, no colour, ASCII dashes."""
    proc = subprocess.run(
        [groff(), "-man", "-Tutf8", "-P-cbou", "-rHY=0", "-rLL=2000n", str(page_path(name))],
        capture_output=True,
        check=True,
    )
    text = proc.stdout.decode("utf-8")
    text = re.sub(r".\x08", "", text)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return text.translate(_DASHES)


@dataclass(frozen=True)
class Page:
    name: str
    lines: tuple[str, ...]

    @classmethod
    def load(cls, name: str) -> Page:
        return cls(name, tuple(render(name).splitlines()))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def section(self, title: str) -> list[str]:
        """The lines of section `title` (without its heading); [] if there is none."""
        out: list[str] = []
        inside = False
        for line in self.lines:
            if line and not line[0].isspace():
                if inside:
                    break
                inside = line.strip() == title
                continue
            if inside:
                out.append(line)
        return out

    def has_section(self, title: str) -> bool:
        return any(line.strip() == title for line in self.lines if line and not line[0].isspace())

    def subsections(self, title: str) -> dict[str, list[str]]:
        """Subsection heading -> its lines, for section `title`."""
        out: dict[str, list[str]] = {}
        current: list[str] | None = None
        for line in self.section(title):
            match = _SUBSECTION.match(line)
            if match:
                heading = match.group(1).strip()
                assert heading not in out, f"{self.name}: subsection {heading!r} appears twice"
                current = out[heading] = []
            elif current is not None:
                current.append(line)
        return out

    def tagged(self, lines: list[str]) -> dict[str, str]:
        """Tag -> body text of the tagged paragraphs (.TP) whose tag is on a line of its own.

        A paragraph at tag indentation ends the body before it and has none itself.
        """
        out: dict[str, str] = {}
        tag: str | None = None
        body: list[str] = []

        def flush() -> None:
            if tag is not None:
                assert tag not in out, f"{self.name}: {tag!r} is described twice"
                out[tag] = "\n".join(body)

        for line in lines:
            if not line.strip():
                continue
            if line.startswith(" " * 14):
                body.append(line.strip())
                continue
            flush()
            match = _TAG.match(line)
            tag, body = (match.group(1).strip() if match else None), []
        flush()
        return out


def mentions(text: str, word: str) -> bool:
    """Whether `word` (a flag, command or key) occurs in `text` as a whole token."""
    return re.search(rf"(?<![\w.\-\[]){re.escape(word)}(?![\w\-\[]|\.\w)", text) is not None
