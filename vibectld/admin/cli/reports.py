"""Commands that report and steer the daemon: usage, audit, show-ca, status, reload."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import click

from vibectl.util.limits import format_usd
from vibectld.admin.cli.base import call, cli, duration_option, for_human, print_json, table, when


@cli.command("usage")
@click.argument("name", required=False)
@click.option(
    "--since",
    metavar="DURATION",
    callback=duration_option,
    help="How far back, e.g. 7d (default: today).",
)
@click.pass_context
def usage(ctx: click.Context, name: str | None, since: str | None) -> None:
    """Requests, errors, tokens and cost per client (UTC days).

    With --json, a list of objects with name, id, requests, errors, input_tokens,
    output_tokens, cost_usd, redactions (secrets the server's redaction policy found in
    the client's prompts: replaced, or the call refused) and redaction_kinds (the same
    per detector kind, e.g. {"jwt": 1, "k8s_secret": 2}). A client with a dollar
    budget also has usd_budget, usd_month (spent this UTC month) and usd_left,
    whatever --since says; the table shows them as BUDGET USD and LEFT USD.
    """
    result = call(ctx, "usage", {"name": name, "since": since})
    rows = result.get("usage") or []
    if ctx.obj.json:
        print_json(rows)
        return
    if not rows:
        click.echo(f"no usage since {result.get('since')}", err=True)
        return
    header = [
        "NAME",
        "REQUESTS",
        "ERRORS",
        "INPUT TOKENS",
        "OUTPUT TOKENS",
        "COST USD",
        "REDACTIONS",
    ]
    cells = [
        [
            str(r["name"]),
            str(r["requests"]),
            str(r["errors"]),
            str(r["input_tokens"]),
            str(r["output_tokens"]),
            f"{r['cost_usd']:.4f}",
            str(r.get("redactions", 0)),
        ]
        for r in rows
    ]
    if any("usd_budget" in r for r in rows):
        # This month's budget and what is left of it, beside the span's cost.
        header = [*header, "BUDGET USD", "LEFT USD"]
        for r, cell in zip(rows, cells, strict=True):
            cell += [_money(r.get("usd_budget")), _money(r.get("usd_left"))]
    click.echo(f"since {result.get('since')} (UTC)", err=True)
    click.echo(table(header, cells, right=set(range(1, len(header)))))


def _money(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


@cli.command("audit")
@click.option(
    "--since", metavar="DURATION", callback=duration_option, help="How far back (default: 7d)."
)
@click.pass_context
def audit(ctx: click.Context, since: str | None) -> None:
    """List admin changes (issue, revoke, update, reload) with who made them."""
    entries = call(ctx, "audit", {"since": since})["entries"]
    if ctx.obj.json:
        print_json(entries)
        return
    header = ["TIME (UTC)", "USER", "UID", "OPERATION", "TARGET", "OUTCOME"]
    rows = [
        [
            when(e.get("at")),
            str(e.get("caller_user")),
            "-" if e.get("caller_uid") is None else str(e.get("caller_uid")),
            str(e.get("op")).replace("_", "-"),
            str(e.get("target") or "-"),
            str(e.get("outcome")),
        ]
        for e in entries
    ]
    click.echo(table(header, rows, right={2}))


@cli.command("show-ca")
@click.pass_context
def show_ca(ctx: click.Context) -> None:
    """Print the PEM of the CA clients must trust; nothing if it is publicly trusted."""
    result = for_human(ctx, "show_ca")
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
    result = for_human(ctx, "status")
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
    if "usd_today" in result:  # a daemon that counts dollars
        lines.append(("spend today", _spend_today(result)))
    if isinstance(result.get("storage"), dict):  # a daemon with a choice of store
        lines.append(("storage", _storage(result["storage"])))
    for node in result.get("nodes") or []:
        lines.append((f"node {node.get('name')}", _node(node)))
    workers = result.get("workers") or []
    if len(workers) > 1:  # one is the daemon itself, already shown by pid and in flight
        for worker in workers:
            lines.append((f"worker {worker.get('index')}", _worker(worker)))
    width = max(len(key) for key, _ in lines) + 1
    for key, value in lines:
        click.echo(f"{key + ':':<{width}} {'-' if value is None else value}")


def _storage(storage: dict[str, Any]) -> str:
    """The backend, whether its database answers, and how old this node's view is."""
    text = str(storage.get("backend"))
    if storage.get("degraded"):
        since = _clock(storage.get("since"))
        text += (
            f", DEGRADED since {since}: {storage.get('reason')} (admin changes fail until "
            "it is back)"
        )
    age = storage.get("view_age_seconds")
    if isinstance(age, int | float):
        text += f", other nodes' changes read {age:g}s ago"
    if storage.get("refusing_calls"):
        text += ", STALE: refusing calls until it is fresh (on_stale: refuse)"
    elif storage.get("stale"):
        text += ", STALE: serving the clients it knows (on_stale: serve)"
    elif "on_stale" in storage and isinstance(age, int | float):
        limit = storage.get("max_staleness_seconds")
        text += f" (stale past {limit:g}s: {storage.get('on_stale')})"
    buffered = storage.get("buffered_calls")
    if isinstance(buffered, int) and buffered and storage.get("degraded"):
        text += f", {buffered} calls' usage waiting in memory"
    return text


def _clock(value: Any) -> str:
    """HH:MM:SS UTC of an ISO time (the outage began today, or the date says otherwise)."""
    if not value:
        return "-"
    try:
        parsed = datetime.fromisoformat(str(value)).astimezone(UTC)
    except ValueError:
        return str(value)
    today = datetime.now(UTC).date()
    fmt = "%H:%M:%S UTC" if parsed.date() == today else "%Y-%m-%d %H:%M:%S UTC"
    return parsed.strftime(fmt)


def _worker(worker: dict[str, Any]) -> str:
    """One serving process of this daemon: pid, state, since when, restarts, load."""
    restarts = worker.get("restarts") or 0
    text = (
        f"pid {worker.get('pid') or '-'}, {worker.get('state')}, started "
        f"{_clock(worker.get('started'))}, {worker.get('in_flight')} in flight"
    )
    if restarts:
        text += f", restarted {restarts} time{'s' if restarts != 1 else ''}"
    return text


def _node(node: dict[str, Any]) -> str:
    """One node of a shared store, as its last heartbeat described it."""
    beat = node.get("heartbeat_at")
    age = node.get("heartbeat_age_seconds")
    if not isinstance(age, int) and isinstance(beat, int):
        age = max(0, int(time.time() - beat))
    ago = f"{_uptime(age)} ago" if isinstance(age, int) else "-"
    text = (
        f"{node.get('address')}, version {node.get('version')}, "
        f"{node.get('in_flight')} in flight, last heartbeat {ago}"
    )
    if node.get("silent"):
        text += " (SILENT: down, or cut off from the database)"
    return text


def _spend_today(result: dict[str, Any]) -> str:
    """The server's spend this UTC day against limits.server_usd_per_day, if it has one."""
    spent = result.get("usd_today")
    if not isinstance(spent, int | float):
        return "-"
    cap = result.get("server_usd_per_day")
    if not isinstance(cap, int | float):
        return f"{format_usd(spent)} (UTC day; no cap)"
    left = format_usd(max(0.0, cap - spent))
    return f"{format_usd(spent)} of {format_usd(cap)} (UTC day; {left} left)"


@cli.command("reload")
@click.option(
    "--wait", is_flag=True, help="Return only when the reload is done (exit 1 if it was rejected)."
)
@click.pass_context
def reload(ctx: click.Context, wait: bool) -> None:
    """Re-read the configuration, certificates and limits (same as SIGHUP).

    An invalid new configuration is rejected and the running one keeps serving.
    """
    result = for_human(ctx, "reload", {"wait": wait})
    if not wait:
        click.echo("reload requested; check it with: journalctl -u vibectld -n 20")
        return
    click.echo("reloaded")
    for note in result.get("restart_needed") or []:
        click.echo(f"note: {note}", err=True)
