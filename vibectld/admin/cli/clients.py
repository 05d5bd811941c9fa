"""Commands on client secrets: issue, list, update, revoke."""

from __future__ import annotations

from typing import Any

import click

from vibectld.admin.cli.base import (
    DEFAULT,
    LIMIT_OR_DEFAULT,
    USD_OR_DEFAULT,
    Limit,
    Usd,
    call,
    cli,
    duration_option,
    for_human,
    model_list,
    print_json,
    split_models,
    table,
    when,
)


@cli.command("issue-client")
@click.argument("name")
@click.option(
    "--expires",
    metavar="DURATION",
    callback=duration_option,
    help="Lifetime: 30m, 12h, 90d, 6w or 1y (m = minutes). Default: the server's "
    "clients.default_expiry.",
)
@click.option(
    "--models", metavar="A,B", callback=model_list, help="Models the client may use. Default: all."
)
@click.option("--rpm", type=Limit(), help="Requests per minute.")
@click.option("--concurrency", type=Limit(), help="Concurrent requests.")
@click.option("--tokens-per-day", type=Limit(), help="Token budget per day.")
@click.option(
    "--usd-per-month", type=Usd(), help="Dollar budget per UTC calendar month, e.g. 20 or 0.5."
)
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
    usd_per_month: float | None,
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
        "usd_per_month": usd_per_month,
        "note": note,
    }
    result = for_human(ctx, "issue_client", args)
    click.echo(result["url"])
    click.echo(
        f"give this URL to {result.get('name', name)}; it is shown only once "
        f"(expires {when(result.get('expires_at'))} UTC)",
        err=True,
    )


@cli.command("list-clients")
@click.option("--all", "show_all", is_flag=True, help="Include expired and revoked clients.")
@click.pass_context
def list_clients(ctx: click.Context, show_all: bool) -> None:
    """List clients: id, name, status, created, expires, last seen, requests.

    Only active clients are listed unless --all is given. Times are UTC. An
    active client whose secret was signed by a retired key (retire-signing-key)
    can no longer authenticate: its status reads 'active (key retired)'. With
    --json, prints a JSON array with every recorded field (key_retired among them).
    """
    clients = call(ctx, "list_clients", {"all": show_all})["clients"]
    if ctx.obj.json:
        print_json(clients)
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
            _status(c),
            when(c.get("created_at")),
            when(c.get("expires_at")),
            when(c.get("last_seen_at"), missing="never"),
            str(c.get("requests", 0)),
        ]
        for c in clients
    ]
    click.echo(table(header, rows, right={6}))
    locked_out = [str(c.get("name")) for c in clients if _key_retired(c)]
    if locked_out:
        click.echo(
            f"{', '.join(locked_out)}: signed by a retired key, refused on every request; "
            "revoke each (vibectl-admin revoke-client NAME) and issue it a new secret "
            "(vibectl-admin issue-client NAME)",
            err=True,
        )


def _key_retired(client: dict[str, Any]) -> bool:
    # Only an active client is worth the warning: an expired or revoked one is refused
    # anyway. A daemon older than the field sends none: nothing is claimed then.
    return client.get("status") == "active" and client.get("key_retired") is True


def _status(client: dict[str, Any]) -> str:
    """The status, qualified where it would mislead: 'active' whose key was retired."""
    status = str(client.get("status", ""))
    return f"{status} (key retired)" if _key_retired(client) else status


@cli.command("update-client")
@click.argument("name_or_id")
@click.option(
    "--models",
    metavar="A,B|all",
    help="Models the client may use; 'all' lifts its list (the server's models apply).",
)
@click.option("--rpm", type=LIMIT_OR_DEFAULT, help="Requests per minute, or 'default'.")
@click.option("--concurrency", type=LIMIT_OR_DEFAULT, help="Concurrent requests, or 'default'.")
@click.option("--tokens-per-day", type=LIMIT_OR_DEFAULT, help="Token budget per day, or 'default'.")
@click.option(
    "--usd-per-month",
    type=USD_OR_DEFAULT,
    help="Dollar budget per UTC calendar month, or 'default'.",
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
    usd_per_month: float | str | None,
    note: str | None,
) -> None:
    """Change an active client's limits or models, effective on its next request.

    'default' drops the client's own value so the server's limits section applies.
    """
    args: dict[str, Any] = {"target": name_or_id}
    if models is not None:
        args["models"] = None if models == "all" else split_models(models)
    for key, value in (
        ("rpm", rpm),
        ("concurrency", concurrency),
        ("tokens_per_day", tokens_per_day),
        ("usd_per_month", usd_per_month),
    ):
        if value is not None:
            args[key] = None if value == DEFAULT else value
    if note is not None:
        args["note"] = note
    if len(args) == 1:
        raise click.UsageError(
            "nothing to change: give --models, --rpm, --concurrency, --tokens-per-day, "
            "--usd-per-month or --note"
        )
    result = for_human(ctx, "update_client", args)
    limits = ", ".join(
        f"{key}={result.get(key) if result.get(key) is not None else 'default'}"
        for key in ("rpm", "concurrency", "tokens_per_day", "usd_per_month")
    )
    models_text = ",".join(result.get("models") or []) or "all"
    click.echo(f"updated {result.get('name')}: models={models_text}, {limits}")


@cli.command("revoke-client")
@click.argument("name_or_id")
@click.option("--reason", help="Why, kept in the registry and the audit log.")
@click.pass_context
def revoke_client(ctx: click.Context, name_or_id: str, reason: str | None) -> None:
    """Revoke a client by name or id, effective for its very next request."""
    result = for_human(ctx, "revoke_client", {"target": name_or_id, "reason": reason})
    click.echo(
        f"revoked {result.get('name', name_or_id)} (id {result.get('id')}); "
        "their next request will be refused"
    )
