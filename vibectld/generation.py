"""Everything a reload replaces, built by one function and swapped as one reference.

A `Generation` is frozen: the configuration, the TLS material, the provider
keys, the model catalogue, the authenticator (whose issuer, audience and
cache of verified secrets belong to one configuration) and the redaction
policy (its compiled detectors) were all built from the same file. Start-up
and reload both call `build_generation`; a reload swaps `Runtime.generation`
in one assignment, so a call that reads it once sees either the old
generation or the new one, never a mix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import structlog

from vibectld.config import ConfigError, DaemonConfig, unpriced_budget_warnings
from vibectld.config_file import load_config
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import (
    CertificateAuthority,
    ServerTLS,
    TLSError,
    default_hosts,
    load_server_tls,
)
from vibectld.providers.catalogue import ModelCatalogue
from vibectld.providers.keys import ProviderKeyError, ProviderKeys
from vibectld.service.auth import Authenticator, ClientLookup
from vibectld.service.redaction import RedactionPolicy


class GenerationRejected(Exception):
    """The new configuration's parts cannot all be built; the message says which and why."""


@dataclass(frozen=True)
class Generation:
    number: int
    config: DaemonConfig
    tls: ServerTLS
    provider_keys: ProviderKeys
    catalogue: ModelCatalogue
    auth: Authenticator
    redaction: RedactionPolicy
    # The cluster's CA (PostgreSQL backend), which issues this node's self-managed
    # certificate; None for the CA in state_dir/tls/. Not reloadable: each generation
    # hands it to the next.
    ca: CertificateAuthority | None = None

    def cost_usd(
        self, model_id: str, input_tokens: int | None, output_tokens: int | None
    ) -> float | None:
        """What a call cost, where `models.prices` has a price for the model."""
        price = self.config.models.prices.get(model_id)
        if price is None:
            return None
        return ((input_tokens or 0) * price.input + (output_tokens or 0) * price.output) / 1e6


def reread_config(path: Path | None, current: DaemonConfig) -> DaemonConfig:
    """The configuration file as it reads now, for a reload (`current` when the daemon
    was started without a file); GenerationRejected if it is invalid."""
    try:
        return load_config(path) if path is not None else current
    except ConfigError as e:
        raise GenerationRejected(str(e)) from None


def build_generation(
    config: DaemonConfig,
    signing: SigningKeys,
    clients: ClientLookup,
    number: int = 1,
    *,
    ca: CertificateAuthority | None = None,
) -> Generation:
    """Build every reloadable part from `config`, or raise GenerationRejected naming the part.

    `ca` issues the self-managed server certificate instead of the CA in state_dir/tls/.
    """
    try:
        tls = load_server_tls(
            config.server.tls, config.state_dir, default_hosts(config.server.public_host), ca=ca
        )
        keys = ProviderKeys.for_daemon(config.config_dir, config.state_dir)
        catalogue = ModelCatalogue.build(config.models, keys)
    except (ConfigError, TLSError, ProviderKeyError) as e:
        raise GenerationRejected(str(e)) from None
    for warning in unpriced_budget_warnings(config, [e.model_id for e in catalogue.entries()]):
        structlog.get_logger("vibectld.budgets").warning("budgets.unpriced_models", hint=warning)
    auth = Authenticator(
        signing, clients, issuer=config.clients.issuer, audience=config.clients.audience
    )
    # Compiled here, once per load: a call only runs the patterns.
    redaction = RedactionPolicy.build(config.redaction)
    return Generation(number, config, tls, keys, catalogue, auth, redaction, ca)
