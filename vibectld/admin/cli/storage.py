"""Commands on where the daemon keeps its state: `storage migrate --to postgresql`."""

from __future__ import annotations

from typing import Any

import click

from vibectld.admin.cli.base import cli, for_human

# How long the daemon may take to copy; the copy is one transaction, so waiting longer
# is safe, and giving up earlier would only leave the operator guessing.
MIGRATE_TIMEOUT = 600.0
# Shown in this order, with the names an operator knows them by.
_COUNTS = (
    ("clients", "client", "clients"),
    ("usage", "usage row", "usage rows"),
    ("redactions", "redaction row", "redaction rows"),
    ("audit", "audit row", "audit rows"),
)


@cli.group("storage")
def storage() -> None:
    """Where vibectld keeps its registry, usage and audit trail."""


@storage.command("migrate")
@click.option(
    "--to",
    "to",
    type=click.Choice(["postgresql"]),
    required=True,
    help="The backend to copy this node's store into.",
)
@click.pass_context
def storage_migrate(ctx: click.Context, to: str) -> None:
    """Copy this node's SQLite store into an empty PostgreSQL database.

    Clients, usage, audit, signing keys and the CA are copied, so every secret and URL
    already issued keeps working on every node. The daemon reads the postgresql-dsn
    and cluster-key credentials as a PostgreSQL node does; a database that is not
    empty is refused. With --json, an object with target, where and copied.
    """
    # A big store (410,000 usage and audit rows) takes seconds to copy, not 30.
    result = for_human(ctx, "storage_migrate", {"target": to}, timeout=MIGRATE_TIMEOUT)
    copied: dict[str, Any] = result.get("copied") or {}
    click.echo(f"copied this node's store into {result.get('where')}:")
    for key, one, many in _COUNTS:
        n = int(copied.get(key) or 0)
        click.echo(f"  {n} {one if n == 1 else many}")
    keys, retired = copied.get("signing_keys", 0), copied.get("retired_signing_keys", 0)
    click.echo(f"  {keys} signing key{'' if keys == 1 else 's'} (and {retired} retired)")
    ca = copied.get("ca_sha256")
    if ca:
        click.echo(f"  the CA (ca-sha256 {ca}): the URLs already issued keep their pin")
    else:
        click.echo(
            "  no CA: server.tls.cert_file is set, so every node needs a certificate from "
            "one CA you run, with the load balancer's name"
        )
    click.echo("next:", err=True)
    click.echo(
        "  1. in vibectld.yaml set storage.backend: postgresql and server.public_url (the "
        "load balancer's URL), then restart this node now (systemctl restart vibectld): "
        "what it changes before the restart stays in SQLite only",
        err=True,
    )
    click.echo(
        "  2. other nodes join with the same postgresql-dsn and cluster-key credentials; "
        'see vibectld(8), "Running several nodes"',
        err=True,
    )
