"""The vibectl-admin command group and what its commands share: the call, output, options."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from vibectl.util.durations import parse_duration
from vibectl.util.limits import check_limit, check_usd
from vibectld.admin.client import AdminClient, AdminClientError, DaemonUnreachable, PermissionDenied
from vibectld.admin.protocol import ErrorCode
from vibectld.version import __version__

DEFAULT_SOCKET = "/run/vibectld/admin.sock"
SOCKET_ENV = "VIBECTLD_ADMIN_SOCKET"

# sysexits(3)
EX_OK = 0
EX_FAILED = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69
EX_NOPERM = 77


@dataclass(frozen=True)
class Options:
    socket: Path
    json: bool


def fail(message: str, code: int) -> NoReturn:
    click.echo(f"vibectl-admin: {message}", err=True)
    sys.exit(code)


def call(
    ctx: click.Context, op: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0
) -> dict[str, Any]:
    opts: Options = ctx.obj
    try:
        with AdminClient(opts.socket, timeout) as client:
            return client.call(op, args)
    except DaemonUnreachable as e:
        fail(e.message, EX_UNAVAILABLE)
    except PermissionDenied as e:
        fail(e.message, EX_NOPERM)
    except AdminClientError as e:
        fail(e.message, EX_USAGE if e.code == ErrorCode.BAD_REQUEST else EX_FAILED)


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def for_human(
    ctx: click.Context, op: str, args: dict[str, Any] | None = None, *, timeout: float = 30.0
) -> dict[str, Any]:
    """Call `op`; with --json print its result and stop here, else return it to format.

    `timeout`: how long the daemon may take to answer (see AdminClient)."""
    result = call(ctx, op, args, timeout=timeout)
    if ctx.obj.json:
        print_json(result)
        ctx.exit(EX_OK)
    return result


def when(value: Any, missing: str = "-") -> str:
    """Format an ISO-8601 time as 'YYYY-MM-DD HH:MM' UTC; keep anything unparseable as is."""
    if not value:
        return missing
    try:
        parsed = datetime.fromisoformat(str(value))
    except ValueError:
        return str(value)
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(UTC)
    return parsed.strftime("%Y-%m-%d %H:%M")


def table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value.strip()


def split_models(value: str) -> list[str]:
    models = [m.strip() for m in value.split(",") if m.strip()]
    if not models:
        raise click.BadParameter("give one or more model names, e.g. gpt-4o,claude-3.5")
    return models


def model_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else split_models(value)


DEFAULT = "default"


class _Amount(click.ParamType[Any]):
    """A number that `check` accepts, or with `or_default` also 'default'.

    'default' drops the client's own value so the server's limits section applies.
    """

    def __init__(
        self,
        metavar: str,
        what: str,
        parse: Callable[[Any], float],
        check: Callable[[Any], Any],
        *,
        or_default: bool,
    ) -> None:
        self.or_default = or_default
        self.name = f"{metavar}|default" if or_default else metavar
        self._what = what
        self._parse = parse
        self._check = check

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self.or_default and value == DEFAULT:
            return DEFAULT
        try:
            number = self._parse(value)
        except (TypeError, ValueError):
            either = " or 'default'" if self.or_default else ""
            self.fail(f"{value!r} is not {self._what}{either}", param, ctx)
        try:
            return self._check(number)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class Limit(_Amount):
    """A limit (see vibectl.util.limits), or with `or_default` also 'default'."""

    def __init__(self, *, or_default: bool = False) -> None:
        super().__init__("N", "a whole number", int, check_limit, or_default=or_default)


LIMIT_OR_DEFAULT = Limit(or_default=True)


class Usd(_Amount):
    """A dollar budget (see vibectl.util.limits.check_usd), or with `or_default` also
    'default'."""

    def __init__(self, *, or_default: bool = False) -> None:
        super().__init__("USD", "a number of US dollars", float, check_usd, or_default=or_default)


USD_OR_DEFAULT = Usd(or_default=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=SOCKET_ENV,
    show_envvar=True,
    default=DEFAULT_SOCKET,
    show_default=True,
    help="The daemon's admin socket.",
)
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
@click.version_option(__version__, prog_name="vibectl-admin")
@click.pass_context
def cli(ctx: click.Context, socket_path: Path, as_json: bool) -> None:
    """Administer vibectld: issue, list and revoke client secrets, rotate signing keys.

    Talks to the daemon's admin socket. Changing state needs root, the daemon's
    user or membership of the admin group (vibectld-admin). Exit codes: 0 ok,
    1 the operation failed, 2 usage error, 69 daemon not reachable, 77
    permission denied.
    """
    ctx.obj = Options(socket=socket_path, json=as_json)
