"""`vibectl-admin`: the operator's CLI, a thin client of the admin socket.

It imports nothing of the daemon beyond `vibectld.admin.protocol`,
`vibectld.admin.client` and `vibectld.version`; a test proves it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from vibectl.util.durations import parse_duration
from vibectl.util.limits import check_limit
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


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"vibectl-admin: {message}", err=True)
    sys.exit(code)


def _call(ctx: click.Context, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    opts: Options = ctx.obj
    try:
        with AdminClient(opts.socket) as client:
            return client.call(op, args)
    except DaemonUnreachable as e:
        _fail(e.message, EX_UNAVAILABLE)
    except PermissionDenied as e:
        _fail(e.message, EX_NOPERM)
    except AdminClientError as e:
        _fail(e.message, EX_USAGE if e.code == ErrorCode.BAD_REQUEST else EX_FAILED)


def _print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def _for_human(ctx: click.Context, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
    """Call `op`; with --json print its result and stop here, else return it to format."""
    result = _call(ctx, op, args)
    if ctx.obj.json:
        _print_json(result)
        ctx.exit(EX_OK)
    return result


def _when(value: Any, missing: str = "-") -> str:
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


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        parse_duration(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None
    return value.strip()


def _split_models(value: str) -> list[str]:
    models = [m.strip() for m in value.split(",") if m.strip()]
    if not models:
        raise click.BadParameter("give one or more model names, e.g. gpt-4o,claude-3.5")
    return models


def _model_list(ctx: click.Context, param: click.Parameter, value: str | None) -> list[str] | None:
    return None if value is None else _split_models(value)


_DEFAULT = "default"


class _Limit(click.ParamType[Any]):
    """A limit (see vibectl.util.limits), or with `or_default` also 'default'.

    'default' drops the client's own value so the server's limits section applies.
    """

    def __init__(self, *, or_default: bool = False) -> None:
        self.or_default = or_default
        self.name = "N|default" if or_default else "N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self.or_default and value == _DEFAULT:
            return _DEFAULT
        try:
            number = int(value)
        except (TypeError, ValueError):
            either = " or 'default'" if self.or_default else ""
            self.fail(f"{value!r} is not a whole number{either}", param, ctx)
        try:
            return check_limit(number)
        except ValueError as e:
            self.fail(str(e), param, ctx)


_LIMIT_OR_DEFAULT = _Limit(or_default=True)


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


@cli.command("issue-client")
@click.argument("name")
@click.option(
    "--expires",
    metavar="DURATION",
    callback=_duration,
    help="Lifetime: 30m, 12h, 90d, 6w or 1y (m = minutes). Default: the server's "
    "clients.default_expiry.",
)
@click.option(
    "--models", metavar="A,B", callback=_model_list, help="Models the client may use. Default: all."
)
@click.option("--rpm", type=_Limit(), help="Requests per minute.")
@click.option("--concurrency", type=_Limit(), help="Concurrent requests.")
@click.option("--tokens-per-day", type=_Limit(), help="Token budget per day.")
@click.option("--note", help="Free text kept with the client (e.g. a ticket number).")
@click.pass_context
def issue_client(
    ctx: click.Context,
    name: str,
    expires: str | None,
    models: list[str] | None,
    rpm: int | None,
    concurrency: int | None,
    tokens_per_day: int | None,
    note: str | None,
) -> None:
    """Create a client secret for NAME and print its connection URL.

    stdout is exactly one line, the vibectl-server:// URL (with --json, an object
    with url, id, name and expires_at). The URL contains the secret and is shown
    only once. Limits not given default to the server's limits section.
    """
    args = {
        "name": name,
        "expires": expires,
        "models": models,
        "rpm": rpm,
        "concurrency": concurrency,
        "tokens_per_day": tokens_per_day,
        "note": note,
    }
    result = _for_human(ctx, "issue_client", args)
    click.echo(result["url"])
    click.echo(
        f"give this URL to {result.get('name', name)}; it is shown only once "
        f"(expires {_when(result.get('expires_at'))} UTC)",
        err=True,
    )


@cli.command("list-clients")
@click.option("--all", "show_all", is_flag=True, help="Include expired and revoked clients.")
@click.pass_context
def list_clients(ctx: click.Context, show_all: bool) -> None:
    """List clients: id, name, status, created, expires, last seen, requests.

    Only active clients are listed unless --all is given. Times are UTC. With
    --json, prints a JSON array with every recorded field.
    """
    clients = _call(ctx, "list_clients", {"all": show_all})["clients"]
    if ctx.obj.json:
        _print_json(clients)
        return
    if not clients:
        hint = "" if show_all else " (--all includes expired and revoked ones)"
        click.echo(f"no clients{hint}", err=True)
        return
    header = ["ID", "NAME", "STATUS", "CREATED", "EXPIRES", "LAST SEEN", "REQUESTS"]
    rows = [
        [
            str(c.get("id", ""))[:12],
            str(c.get("name", "")),
            str(c.get("status", "")),
            _when(c.get("created_at")),
            _when(c.get("expires_at")),
            _when(c.get("last_seen_at"), missing="never"),
            str(c.get("requests", 0)),
        ]
        for c in clients
    ]
    click.echo(_table(header, rows, right={6}))


@cli.command("update-client")
@click.argument("name_or_id")
@click.option(
    "--models",
    metavar="A,B|all",
    help="Models the client may use; 'all' lifts its list (the server's models apply).",
)
@click.option("--rpm", type=_LIMIT_OR_DEFAULT, help="Requests per minute, or 'default'.")
@click.option("--concurrency", type=_LIMIT_OR_DEFAULT, help="Concurrent requests, or 'default'.")
@click.option(
    "--tokens-per-day", type=_LIMIT_OR_DEFAULT, help="Token budget per day, or 'default'."
)
@click.option("--note", help="Replace the client's note.")
@click.pass_context
def update_client(
    ctx: click.Context,
    name_or_id: str,
    models: str | None,
    rpm: int | str | None,
    concurrency: int | str | None,
    tokens_per_day: int | str | None,
    note: str | None,
) -> None:
    """Change an active client's limits or models, effective on its next request.

    'default' drops the client's own value so the server's limits section applies.
    """
    args: dict[str, Any] = {"target": name_or_id}
    if models is not None:
        args["models"] = None if models == "all" else _split_models(models)
    for key, value in (
        ("rpm", rpm),
        ("concurrency", concurrency),
        ("tokens_per_day", tokens_per_day),
    ):
        if value is not None:
            args[key] = None if value == _DEFAULT else value
    if note is not None:
        args["note"] = note
    if len(args) == 1:
        raise click.UsageError(
            "nothing to change: give --models, --rpm, --concurrency, --tokens-per-day or --note"
        )
    result = _for_human(ctx, "update_client", args)
    limits = ", ".join(
        f"{key}={result.get(key) if result.get(key) is not None else 'default'}"
        for key in ("rpm", "concurrency", "tokens_per_day")
    )
    models_text = ",".join(result.get("models") or []) or "all"
    click.echo(f"updated {result.get('name')}: models={models_text}, {limits}")


@cli.command("usage")
@click.argument("name", required=False)
@click.option(
    "--since",
    metavar="DURATION",
    callback=_duration,
    help="How far back, e.g. 7d (default: today).",
)
@click.pass_context
def usage(ctx: click.Context, name: str | None, since: str | None) -> None:
    """Requests, errors, tokens and cost per client (UTC days).

    With --json, a list of objects with name, id, requests, errors, input_tokens,
    output_tokens and cost_usd.
    """
    result = _call(ctx, "usage", {"name": name, "since": since})
    rows = result.get("usage") or []
    if ctx.obj.json:
        _print_json(rows)
        return
    if not rows:
        click.echo(f"no usage since {result.get('since')}", err=True)
        return
    header = ["NAME", "REQUESTS", "ERRORS", "INPUT TOKENS", "OUTPUT TOKENS", "COST USD"]
    table = [
        [
            str(r["name"]),
            str(r["requests"]),
            str(r["errors"]),
            str(r["input_tokens"]),
            str(r["output_tokens"]),
            f"{r['cost_usd']:.4f}",
        ]
        for r in rows
    ]
    click.echo(f"since {result.get('since')} (UTC)", err=True)
    click.echo(_table(header, table, right={1, 2, 3, 4, 5}))


@cli.command("audit")
@click.option("--since", metavar="DURATION", callback=_duration, help="How far back (default: 7d).")
@click.pass_context
def audit(ctx: click.Context, since: str | None) -> None:
    """List admin changes (issue, revoke, update, reload) with who made them."""
    entries = _call(ctx, "audit", {"since": since})["entries"]
    if ctx.obj.json:
        _print_json(entries)
        return
    header = ["TIME (UTC)", "USER", "UID", "OPERATION", "TARGET", "OUTCOME"]
    rows = [
        [
            _when(e.get("at")),
            str(e.get("caller_user")),
            "-" if e.get("caller_uid") is None else str(e.get("caller_uid")),
            str(e.get("op")).replace("_", "-"),
            str(e.get("target") or "-"),
            str(e.get("outcome")),
        ]
        for e in entries
    ]
    click.echo(_table(header, rows, right={2}))


@cli.command("revoke-client")
@click.argument("name_or_id")
@click.option("--reason", help="Why, kept in the registry and the audit log.")
@click.pass_context
def revoke_client(ctx: click.Context, name_or_id: str, reason: str | None) -> None:
    """Revoke a client by name or id, effective for its very next request."""
    result = _for_human(ctx, "revoke_client", {"target": name_or_id, "reason": reason})
    click.echo(
        f"revoked {result.get('name', name_or_id)} (id {result.get('id')}); "
        "their next request will be refused"
    )


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


@cli.command("rotate-signing-key")
@click.pass_context
def rotate_signing_key(ctx: click.Context) -> None:
    """Make a new signing key the one that signs new secrets.

    Secrets signed by older keys keep working until their key is retired with
    retire-signing-key. With --json, an object with kid, created_at and previous.
    """
    result = _for_human(ctx, "rotate_signing_key")
    click.echo(f"{result.get('kid')} signs new secrets from now on")
    click.echo(
        f"secrets signed by older keys keep working; when their clients have new ones: "
        f"vibectl-admin retire-signing-key {result.get('previous')}",
        err=True,
    )


@cli.command("retire-signing-key")
@click.argument("kid")
@click.pass_context
def retire_signing_key(ctx: click.Context, kid: str) -> None:
    """Refuse every secret signed by KID, from its next request on.

    Refused for the current key (which is also the case for the only one): rotate
    first. The key file moves to signing-keys/retired/, so it stays retired after
    a restart. With --json, an object with kid, active_clients, cancelled_calls and
    unknown_kid_clients.
    """
    result = _for_human(ctx, "retire_signing_key", {"target": kid})
    count = result.get("active_clients", 0)
    click.echo(
        f"retired {result.get('kid', kid)}: the secrets it signed are refused from now on "
        f"({_count(count, 'active client')}, "
        f"{_count(result.get('cancelled_calls', 0), 'running call')} cancelled)"
    )
    if count:
        click.echo("issue those clients new secrets; vibectl-admin --json list-clients", err=True)
        click.echo("shows the kid that signed each client's secret", err=True)


@cli.command("list-signing-keys")
@click.pass_context
def list_signing_keys(ctx: click.Context) -> None:
    """List signing keys: kid, created, status, active clients each signed.

    The status is current (signs new secrets), verifies (an older key whose secrets
    still work) or retired. Clients issued before vibectld recorded kids are counted
    as unknown. With --json, an object with keys (kid, created_at, current, retired,
    active_clients) and unknown_kid_clients.
    """
    result = _for_human(ctx, "list_signing_keys")
    header = ["KID", "CREATED", "STATUS", "ACTIVE CLIENTS"]
    rows = [
        [
            str(k.get("kid")),
            _when(k.get("created_at")),
            "current" if k.get("current") else "retired" if k.get("retired") else "verifies",
            str(k.get("active_clients", 0)),
        ]
        for k in result.get("keys") or []
    ]
    unknown = result.get("unknown_kid_clients") or 0
    if unknown:
        rows.append(["unknown", "-", "-", str(unknown)])
    click.echo(_table(header, rows, right={3}))
    if unknown:
        click.echo(
            "unknown: clients issued by an older vibectld, which did not record the key "
            "that signed each secret; retiring that key refuses them too",
            err=True,
        )


@cli.command("show-ca")
@click.pass_context
def show_ca(ctx: click.Context) -> None:
    """Print the PEM of the CA clients must trust; nothing if it is publicly trusted."""
    result = _for_human(ctx, "show_ca")
    pem = result.get("pem")
    if pem:
        click.echo(pem, nl=not pem.endswith("\n"))


def _uptime(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{days}d"] if days else []
    parts += [f"{hours}h"] if days or hours else []
    parts += [f"{minutes}m", f"{secs}s"]
    return " ".join(parts)


@cli.command("status")
@click.pass_context
def status(ctx: click.Context) -> None:
    """Show the daemon's version, uptime, listeners, models, clients and load."""
    result = _for_human(ctx, "status")
    listeners = result.get("listeners") or {}
    clients = result.get("clients") or {}
    lines = [
        ("version", result.get("version")),
        ("pid", result.get("pid")),
        ("uptime", _uptime(result.get("uptime_seconds"))),
        ("grpc listener", listeners.get("grpc")),
        ("admin socket", listeners.get("admin")),
        ("default model", result.get("default_model")),
        ("models", ", ".join(map(str, result.get("models") or [])) or "-"),
        (
            "clients",
            f"{clients.get('active', 0)} active, {clients.get('expired', 0)} expired, "
            f"{clients.get('revoked', 0)} revoked",
        ),
        ("in flight", result.get("in_flight")),
    ]
    width = max(len(key) for key, _ in lines) + 1
    for key, value in lines:
        click.echo(f"{key + ':':<{width}} {'-' if value is None else value}")


@cli.command("reload")
@click.option(
    "--wait", is_flag=True, help="Return only when the reload is done (exit 1 if it was rejected)."
)
@click.pass_context
def reload(ctx: click.Context, wait: bool) -> None:
    """Re-read the configuration, certificates and limits (same as SIGHUP).

    An invalid new configuration is rejected and the running one keeps serving.
    """
    result = _for_human(ctx, "reload", {"wait": wait})
    if not wait:
        click.echo("reload requested; check it with: journalctl -u vibectld -n 20")
        return
    click.echo("reloaded")
    for note in result.get("restart_needed") or []:
        click.echo(f"note: {note}", err=True)


def main() -> None:
    cli.main(prog_name="vibectl-admin")


if __name__ == "__main__":
    main()
