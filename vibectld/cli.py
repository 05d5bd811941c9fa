"""`vibectld`: flags → load_config → Daemon(config).run()."""

from __future__ import annotations

import asyncio
import sys

import click
import structlog

from vibectld.config import ConfigError, unpriced_budget_warnings
from vibectld.config_file import load_config, resolve_config_path
from vibectld.ops import logs
from vibectld.version import __version__


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    help="Configuration file [env VIBECTLD_CONFIG; default /etc/vibectld/config.yaml].",
)
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit 0 or 1.")
@click.option(
    "--generate-cluster-key",
    is_flag=True,
    help="Print a new cluster key (for storage.backend: postgresql) and exit.",
)
# A worker process: the main process starts this same command with the file descriptor
# of its end of their private channel (workers/). Not for operators: hidden.
@click.option("--worker-fd", type=int, default=None, hidden=True)
@click.version_option(
    __version__, "--version", prog_name="vibectld", message="%(prog)s %(version)s"
)
def main(
    config_file: str | None,
    check_config: bool,
    generate_cluster_key: bool,
    worker_fd: int | None,
) -> None:
    """Run the vibectl LLM proxy daemon in the foreground.

    It serves gRPC over TLS to vibectl clients and a local admin socket for
    vibectl-admin. See vibectld(8) and vibectld.yaml(5).
    """
    if generate_cluster_key:
        _print_cluster_key()
        return
    if worker_fd is not None:
        # A worker serves its main process's configuration (sent over the channel), not
        # the file as it is now: one started again after a bad edit still starts.
        from vibectld.workers.worker import run_worker

        sys.exit(run_worker(worker_fd))
    path = resolve_config_path(config_file)
    try:
        config = load_config(path)
    except ConfigError as e:
        click.echo(f"vibectld: {e}", err=True)
        sys.exit(1)
    if check_config:
        click.echo(f"{path}: configuration is valid")
        # Valid, but worth knowing before a budgeted client meets it.
        for warning in unpriced_budget_warnings(config):
            click.echo(f"vibectld: warning: {warning}", err=True)
        return
    logs.configure(config.logging.level, config.logging.format)
    # Imported here so --check-config and --version stay fast.
    from vibectld.daemon import Daemon
    from vibectld.errors import STARTUP_ERRORS
    from vibectld.workers import worker_count

    count = worker_count(config)
    try:
        if count > 1:
            from vibectld.workers.supervisor import Supervisor

            asyncio.run(Supervisor(config, count).run())
        else:
            asyncio.run(Daemon(config).run())
    except STARTUP_ERRORS as e:
        structlog.get_logger("vibectld").error("start_failed", error=str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        pass


def _print_cluster_key() -> None:
    # Made once per cluster; every node needs the same file. Only the key goes to stdout,
    # so `vibectld --generate-cluster-key > file` makes the file. Imported here, as the
    # daemon is below, so that --version and --check-config stay fast.
    from vibectld.pki.sealed import ClusterKey

    _, text = ClusterKey.generate()
    click.echo(text)
    click.echo(
        "vibectld: save it, mode 0600, as /etc/vibectld/keys/cluster-key on every node, "
        "the same file on each (or pass it with LoadCredential=cluster-key:FILE)",
        err=True,
    )


if __name__ == "__main__":
    main()
