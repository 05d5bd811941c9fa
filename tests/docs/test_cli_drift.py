"""The man pages and the click command trees cannot drift apart.

Every command and every option flag of vibectl-admin, vibectl and vibectld is
documented in its page, and every command the page documents exists.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import click
import pytest

import vibectl.cli
import vibectld.admin.cli
import vibectld.cli
from tests.docs.manpage import Page, mentions

CLIS = {
    "vibectl-admin.8": vibectld.admin.cli.cli,
    "vibectl.1": vibectl.cli.main,
    "vibectld.8": vibectld.cli.main,
}
_COMMAND_WORD = re.compile(r"^[a-z][a-z0-9-]*$")
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

CommandPath = tuple[str, ...]


def walk(cmd: click.Command, path: CommandPath = ()) -> Iterator[tuple[CommandPath, click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from walk(sub, (*path, name))


def leaves(root: click.Command) -> dict[CommandPath, click.Command]:
    return {p: c for p, c in walk(root) if p and not isinstance(c, click.Group)}


def flags(cmd: click.Command) -> list[str]:
    return [
        opt
        for param in cmd.params
        if isinstance(param, click.Option)
        for opt in (*param.opts, *param.secondary_opts)
    ]


def help_flags(cmd: click.Command) -> list[str]:
    option = cmd.get_help_option(click.Context(cmd))
    return list(option.opts) if option is not None else []


def documented_commands(page: Page) -> dict[CommandPath, tuple[str, str]]:
    """Command path -> (subsection heading, subsection text), from the COMMANDS section."""
    out: dict[CommandPath, tuple[str, str]] = {}
    for heading, lines in page.subsections("COMMANDS").items():
        words: list[str] = []
        for word in heading.split():
            if not _COMMAND_WORD.match(word):
                break
            words.append(word)
        assert words, f"{page.name}: COMMANDS subsection {heading!r} names no command"
        assert tuple(words) not in out, f"{page.name}: {' '.join(words)} is documented twice"
        out[tuple(words)] = (heading, "\n".join(lines))
    return out


@pytest.mark.parametrize("name", sorted(CLIS))
def test_global_options_are_documented(name: str) -> None:
    root = CLIS[name]
    options = "\n".join(Page.load(name).section("OPTIONS"))
    missing = [f for f in [*flags(root), *help_flags(root)] if not mentions(options, f)]
    assert missing == [], f"{name}: OPTIONS lacks {missing}"


@pytest.mark.parametrize("name", sorted(CLIS))
def test_documented_commands_are_the_real_ones(name: str) -> None:
    page = Page.load(name)
    real = {" ".join(p) for p in leaves(CLIS[name])}
    if not real:
        assert not page.has_section("COMMANDS"), f"{name}: documents commands it does not have"
        return
    documented = {" ".join(p) for p in documented_commands(page)}
    assert documented - real == set(), f"{name}: documents commands that do not exist"
    assert real - documented == set(), f"{name}: commands missing from COMMANDS"


@pytest.mark.parametrize("name", sorted(CLIS))
def test_every_command_name_appears(name: str) -> None:
    text = Page.load(name).text
    names = {word for path, _ in walk(CLIS[name]) for word in path}
    assert [n for n in sorted(names) if not mentions(text, n)] == []


@pytest.mark.parametrize("name", sorted(CLIS))
def test_each_command_documents_its_options_and_arguments(name: str) -> None:
    root = CLIS[name]
    documented = documented_commands(Page.load(name))
    problems: list[str] = []
    for path, cmd in leaves(root).items():
        if path not in documented:
            continue  # reported by test_documented_commands_are_the_real_ones
        heading, text = documented[path]
        label = " ".join(path)
        for flag in flags(cmd):
            if not mentions(text, flag):
                problems.append(f"{label}: option {flag} is not documented")
        for param in cmd.params:
            if isinstance(param, click.Argument):
                arg = param.human_readable_name
                if arg not in re.findall(r"[A-Z][A-Z0-9_]*", heading):
                    problems.append(f"{label}: argument {arg} is not in {heading!r}")
        # Flags the text mentions must exist on the command or one of its parents.
        known = set(flags(cmd)) | set(help_flags(cmd))
        for depth in range(len(path)):
            parent = root if depth == 0 else _command_at(root, path[:depth])
            known |= set(flags(parent))
        for flag in set(_FLAG.findall(text)) - known:
            problems.append(f"{label}: documents {flag}, which the command does not have")
    assert problems == []


def _command_at(root: click.Command, path: CommandPath) -> click.Command:
    cmd = root
    for word in path:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[word]
    return cmd
