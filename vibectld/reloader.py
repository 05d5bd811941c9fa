"""Reloading: build the new configuration's parts off to the side, then swap them in.

Nothing of the running configuration changes unless every new part (config,
certificates, provider keys, model catalogue) was built without error, so a
broken reload leaves the daemon serving exactly as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path

import structlog

from vibectld.config import ConfigError, DaemonConfig, load_config
from vibectld.pki.tls import TLSError, default_hosts, load_server_tls
from vibectld.providers.catalogue import ModelCatalogue
from vibectld.providers.keys import ProviderKeyError, ProviderKeys
from vibectld.runtime import Runtime

log = structlog.get_logger("vibectld")


class ReloadRejected(Exception):
    """The new configuration is unusable; the old one keeps serving."""


def _pin_restart_only(old: DaemonConfig, new: DaemonConfig) -> tuple[DaemonConfig, list[str]]:
    """Keep the settings only a restart can change, and say which ones differed."""
    notes = []
    if new.server.listen != old.server.listen:
        notes.append(f"server.listen changed to {new.server.listen}: restart vibectld to apply")
    if new.admin != old.admin:
        notes.append("admin.socket/admin.group changed: restart vibectld to apply")
    if new.logging != old.logging:
        notes.append("logging changed: restart vibectld to apply")
    if new.metrics != old.metrics:
        notes.append("metrics.listen changed: restart vibectld to apply")
    if new.state_dir != old.state_dir:
        notes.append(f"state_dir changed to {new.state_dir}: restart vibectld to apply")
    kept = dataclasses.replace(
        new,
        server=dataclasses.replace(new.server, listen=old.server.listen),
        admin=old.admin,
        metrics=old.metrics,
        logging=old.logging,
        state_dir=old.state_dir,
    )
    return kept, notes


async def _close_later(catalogue: ModelCatalogue, delay: float) -> None:
    # Calls that started before the swap may still use the old catalogue's connections.
    await asyncio.sleep(delay)
    with contextlib.suppress(Exception):
        await catalogue.aclose()


def reload_runtime(rt: Runtime, config_path: Path | None) -> list[str]:
    """Re-read config, certificates, keys and models into `rt`; returns restart-only notes."""
    old = rt.config
    try:
        fresh = load_config(config_path) if config_path is not None else old
        new, notes = _pin_restart_only(old, fresh)
        tls = load_server_tls(new.server.tls, new.state_dir, default_hosts(new.server.public_host))
        keys = ProviderKeys.for_daemon(new.config_dir, new.state_dir)
        catalogue = ModelCatalogue.build(new.models, keys)
    except (ConfigError, TLSError, ProviderKeyError) as e:
        raise ReloadRejected(str(e)) from None
    previous = rt.catalogue
    rt.config, rt.tls, rt.provider_keys, rt.catalogue = new, tls, keys, catalogue
    rt.executor.redact = keys.redact
    rt.background(_close_later(previous, new.limits.request_timeout_seconds + 5))
    for note in notes:
        log.warning("reload.restart_needed", detail=note)
    return notes
