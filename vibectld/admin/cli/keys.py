"""Commands on the keys that sign client secrets: rotate, retire, list."""

from __future__ import annotations

import click

from vibectld.admin.cli.base import cli, for_human, table, when


def _count(n: int, thing: str) -> str:
    return f"{n} {thing}{'' if n == 1 else 's'}"


@cli.command("rotate-signing-key")
@click.pass_context
def rotate_signing_key(ctx: click.Context) -> None:
    """Make a new signing key the one that signs new secrets.

    Secrets signed by older keys keep working until their key is retired with
    retire-signing-key. With --json, an object with kid, created_at and previous.
    """
    result = for_human(ctx, "rotate_signing_key")
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
    result = for_human(ctx, "retire_signing_key", {"target": kid})
    count = result.get("active_clients", 0)
    click.echo(
        f"retired {result.get('kid', kid)}: the secrets it signed are refused from now on "
        f"({_count(count, 'active client')}, "
        f"{_count(result.get('cancelled_calls', 0), 'running call')} cancelled)"
    )
    if count:
        click.echo(
            "issue those clients new secrets; vibectl-admin list-clients marks them "
            "'active (key retired)'",
            err=True,
        )


@cli.command("list-signing-keys")
@click.pass_context
def list_signing_keys(ctx: click.Context) -> None:
    """List signing keys: kid, created, status, active clients each signed.

    The status is current (signs new secrets), verifies (an older key whose secrets
    still work) or retired. Clients issued before vibectld recorded kids are counted
    as unknown. With --json, an object with keys (kid, created_at, current, retired,
    active_clients) and unknown_kid_clients.
    """
    result = for_human(ctx, "list_signing_keys")
    header = ["KID", "CREATED", "STATUS", "ACTIVE CLIENTS"]
    rows = [
        [
            str(k.get("kid")),
            when(k.get("created_at")),
            "current" if k.get("current") else "retired" if k.get("retired") else "verifies",
            str(k.get("active_clients", 0)),
        ]
        for k in result.get("keys") or []
    ]
    unknown = result.get("unknown_kid_clients") or 0
    if unknown:
        rows.append(["unknown", "-", "-", str(unknown)])
    click.echo(table(header, rows, right={3}))
    if unknown:
        click.echo(
            "unknown: clients issued by an older vibectld, which did not record the key "
            "that signed each secret; retiring that key refuses them too",
            err=True,
        )
