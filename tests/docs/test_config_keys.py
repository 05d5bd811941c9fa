"""vibectld.yaml(5) documents exactly the keys vibectld/config_file.py accepts, with their defaults.

The keys and their defaults are taken from the loader itself: a recording
stand-in for its section reader notes every key parse_config() looks up, with
the default it would use.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.docs.manpage import Page
from vibectld import config, config_file, config_values
from vibectld.admin.protocol import parse_duration

PAGE = "vibectld.yaml.5"
T = TypeVar("T")
# Lists of entries are written KEY[].NAME, mappings of entries KEY.PLACEHOLDER.NAME.
ENTRIES: dict[str, Any] = {
    "openai_compatible": [{"model_id": "m", "model_name": "n", "api_base": "http://h/v1"}],
    "prices": {"MODEL": {"input": 1, "output": 2}},
}
_KEY_TAG = re.compile(r"^[a-z_]+(?:\[\])?(?:\.(?:[a-z_]+|[A-Z]+)(?:\[\])?)*$")
_FIRST_LINE = re.compile(
    r"^Type: (?P<type>.+?)\.\s+(?:Default: (?P<default>.+?)\.\s+)?"
    r"Reload: (?P<reload>applied|needs a restart)\."
)


@dataclasses.dataclass(frozen=True)
class Key:
    default: Any
    conv: Callable[[str, Any], Any]


@dataclasses.dataclass(frozen=True)
class Accepted:
    keys: dict[str, Key]
    sections: frozenset[str]


def accepted(monkeypatch: pytest.MonkeyPatch) -> Accepted:
    """Every leaf key and section parse_config() reads, as dotted YAML names."""
    keys: dict[str, Key] = {}
    sections: set[str] = set()

    class Recording(config_file._Section):
        def get(self, name: str, conv: Callable[[str, Any], T], default: T) -> T:
            keys[re.sub(r"\[\d+\]", "[]", self.key(name))] = Key(default, conv)
            return super().get(name, conv, default)

        def section(self, name: str) -> config_file._Section:
            sections.add(self.key(name))
            return super().section(name)

    monkeypatch.setattr(config_file, "_Section", Recording)
    # One entry in each collection of entries, so that the entries' keys are read too.
    config_file.parse_config({"models": ENTRIES})
    monkeypatch.undo()
    assert len(keys) > 30, f"the recording saw too few keys: {sorted(keys)}"
    return Accepted(keys, frozenset(sections))


def documented() -> dict[str, str]:
    """Key -> the body of its entry in the KEYS section."""
    page = Page.load(PAGE)
    out: dict[str, str] = {}
    for lines in page.subsections("KEYS").values():
        for tag, body in page.tagged(lines).items():
            if _KEY_TAG.match(tag):
                assert tag not in out, f"{tag} is documented twice"
                out[tag] = body
    return out


def test_every_key_is_documented_and_every_documented_key_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = set(accepted(monkeypatch).keys)
    docs = set(documented())
    assert sorted(keys - docs) == [], "keys vibectld accepts but vibectld.yaml(5) lacks"
    assert sorted(docs - keys) == [], "keys vibectld.yaml(5) documents but vibectld rejects"


def test_every_section_has_a_subsection(monkeypatch: pytest.MonkeyPatch) -> None:
    headings = set(Page.load(PAGE).subsections("KEYS"))
    top = {s for s in accepted(monkeypatch).sections if "." not in s}
    assert sorted(top - headings) == []


def _same(documented: str, key: Key) -> bool:
    value = key.default
    if key.conv is config_values._duration:
        # Written as a duration (90d), held in seconds.
        return isinstance(value, int) and parse_duration(documented) == value
    if key.conv is config_values._interval:
        # Written as an interval (5s), held in seconds.
        return bool(key.conv("", documented) == value)
    if value is None:
        return documented == "null"
    if isinstance(value, bool):
        return documented == str(value).lower()
    if isinstance(value, int | float):
        return float(documented.split()[0]) == value
    if isinstance(value, Path):
        return documented == str(value)
    if isinstance(value, tuple | list):
        return not value and documented == "[]"
    if isinstance(value, Mapping):
        return not value and documented == "{}"
    return isinstance(value, str) and documented == value


def test_defaults_and_reload_behaviour_are_stated(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = accepted(monkeypatch).keys
    problems: list[str] = []
    for name, body in sorted(documented().items()):
        if name not in keys:
            continue  # reported by the test above
        match = _FIRST_LINE.match(body)
        if match is None:
            problems.append(f"{name}: entry does not start 'Type: ... Default: ... Reload: ...'")
            continue
        key = keys[name]
        default = match.group("default")
        # The loader reads a required string with the default "" and then refuses it.
        if key.default == "":
            if default is not None or "required" not in match.group("type"):
                problems.append(f"{name}: is required, but the page gives it a default")
        elif default is None:
            problems.append(f"{name}: the page states no default (the code's is {key.default!r})")
        elif name == "server.name":
            # The default is socket.gethostname(), which the page describes in words.
            assert key.default == socket.gethostname()
            if "host name" not in default:
                problems.append(f"{name}: default should be described as the host name")
        elif not _same(default, key):
            problems.append(f"{name}: page says default {default!r}, code says {key.default!r}")
    assert problems == []


def _flatten(raw: Mapping[str, Any], prefix: str, found: Accepted) -> set[str]:
    """The dotted keys a parsed YAML file sets, named as the page names them."""
    out: set[str] = set()
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if key in found.sections:
            out |= _flatten(value or {}, key, found)
            continue
        out.add(key)
        if isinstance(value, list):
            for item in value:
                if isinstance(item, Mapping):
                    out |= _flatten(item, f"{key}[]", found)
        elif isinstance(value, Mapping):
            holders = {
                k[len(key) + 1 :].split(".")[0] for k in found.keys if k.startswith(key + ".")
            }
            for holder in holders:
                for item in value.values():
                    if isinstance(item, Mapping):
                        out |= _flatten(item, f"{key}.{holder}", found)
    return out


def test_example_is_valid_and_complete(monkeypatch: pytest.MonkeyPatch) -> None:
    found = accepted(monkeypatch)
    lines = Page.load(PAGE).section("EXAMPLE")
    start = next(i for i, line in enumerate(lines) if line.startswith(" " * 11))
    raw = yaml.safe_load(textwrap.dedent("\n".join(lines[start:])))
    config_file.parse_config(raw)
    assert sorted(set(found.keys) - _flatten(raw, "", found)) == []


def test_restart_only_keys_are_the_declared_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's "Reload: needs a restart" marks are exactly config.RESTART_ONLY."""
    keys = accepted(monkeypatch).keys
    marked = set()
    for name, body in documented().items():
        match = _FIRST_LINE.match(body)
        if match is not None and match.group("reload") == "needs a restart":
            marked.add(name)
    assert sorted(marked) == sorted(config.RESTART_ONLY)
    assert set(config.RESTART_ONLY) <= set(keys), "a declared key that the loader never reads"
