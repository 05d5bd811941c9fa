"""The model catalogue: which llm models this server offers, under which names.

Every model arrives through the llm plugin registry, including the
operator's OpenAI-compatible endpoints, which this module registers as a
plugin of its own so that the core never special-cases a vendor.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llm
import structlog
from llm.plugins import pm

from vibectld.config import ModelsConfig, OpenAICompatibleModel
from vibectld.providers.keys import ProviderKeys
from vibectld.providers.openai_compatible import (
    PLUGIN_NAME,
    OpenAICompatiblePlugin,
    close_clients,
    pool_clients,
)

log = structlog.get_logger("vibectld.providers.catalogue")


class UnknownModel(Exception):
    """The requested model is not offered; the message lists what is."""


@dataclass(frozen=True)
class CatalogueEntry:
    model_id: str
    provider: str
    aliases: tuple[str, ...]
    supports_streaming: bool
    supports_schema: bool
    # The llm model objects; the async one is preferred when both exist.
    async_model: Any = field(repr=False, compare=False)
    sync_model: Any = field(repr=False, compare=False)
    # Hides the provider keys of the catalogue's generation in this model's error texts.
    redact: Callable[[str], str] = field(repr=False, compare=False, default=str)


def point_llm_at(state_dir: Path) -> None:
    """Keep llm's user directory (keys.json, logs.db, aliases) inside the state directory."""
    llm_dir = state_dir / "llm"
    llm_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["LLM_USER_PATH"] = str(llm_dir)


def _register_endpoints(endpoints: tuple[OpenAICompatibleModel, ...]) -> None:
    if pm.get_plugin(PLUGIN_NAME) is not None:
        pm.unregister(name=PLUGIN_NAME)
    if endpoints:
        pm.register(OpenAICompatiblePlugin(endpoints), name=PLUGIN_NAME)


def _provider(model: Any) -> str:
    if model.needs_key:
        return str(model.needs_key)
    top = type(model).__module__.split(".")[0]
    return top.removeprefix("llm_").replace("_", "-")


class ModelCatalogue:
    """An immutable view of the models on offer; rebuilt on reload."""

    def __init__(
        self,
        entries: dict[str, CatalogueEntry],
        aliases: dict[str, str],
        default: str,
    ) -> None:
        self._entries = entries
        self._aliases = aliases
        self.default = default

    @classmethod
    def build(cls, config: ModelsConfig, keys: ProviderKeys) -> ModelCatalogue:
        _register_endpoints(config.openai_compatible)
        offered: dict[str, CatalogueEntry] = {}
        llm_aliases: dict[str, str] = {}
        missing_keys: list[str] = []
        for mwa in llm.get_models_with_aliases():
            model = mwa.async_model or mwa.model
            model_id = model.model_id
            for alias in mwa.aliases:
                llm_aliases.setdefault(alias, model_id)
            if (
                config.allowed
                and model_id not in config.allowed
                and not (set(mwa.aliases) & set(config.allowed))
            ):
                continue
            needs = model.needs_key
            if needs:
                key = keys.get(needs, model.key_env_var)
                if key is None:
                    missing_keys.append(f"{model_id} (key '{needs}')")
                    continue
                for m in (mwa.model, mwa.async_model):
                    if m is not None:
                        m.key = key
            for m in (mwa.model, mwa.async_model):
                if m is not None:
                    pool_clients(m)
            offered[model_id] = CatalogueEntry(
                model_id=model_id,
                provider=_provider(model),
                aliases=tuple(sorted(mwa.aliases)),
                supports_streaming=bool(model.can_stream),
                supports_schema=bool(model.supports_schema),
                async_model=mwa.async_model,
                sync_model=mwa.model,
                redact=keys.redact,
            )
        if config.allowed:
            unknown = [
                name
                for name in config.allowed
                if name not in offered and llm_aliases.get(name) not in offered
            ]
            if unknown:
                log.warning(
                    "models.allowed_unavailable",
                    models=unknown,
                    hint="not installed, misspelt, or their provider key is missing",
                )
        aliases = {a: t for a, t in llm_aliases.items() if t in offered and a not in offered}
        for alias, target in config.aliases.items():
            target_id = target if target in offered else llm_aliases.get(target, target)
            if target_id in offered:
                aliases[alias] = target_id
            else:
                log.warning("models.alias_unavailable", alias=alias, target=target)
        catalogue = cls(offered, aliases, config.default)
        if not catalogue.has(config.default):
            log.warning(
                "models.default_unavailable",
                model=config.default,
                hint="requests without a model will fail; fix models.default or add its key",
            )
        log.info(
            "models.loaded",
            models=sorted(offered),
            default=config.default,
            without_key=len(missing_keys),
        )
        return catalogue

    def has(self, name: str) -> bool:
        return name in self._entries or self._aliases.get(name) in self._entries

    def resolve(self, name: str | None) -> CatalogueEntry:
        """The entry for a model id or alias; None means the server's default."""
        wanted = name or self.default
        entry = self._entries.get(wanted) or self._entries.get(self._aliases.get(wanted, ""))
        if entry is None:
            available = ", ".join(sorted(self._entries)) or "none"
            what = f"model '{wanted}'" if name else f"the server's default model '{wanted}'"
            raise UnknownModel(f"{what} is not available on this server; available: {available}")
        return entry

    def entries(self) -> list[CatalogueEntry]:
        return [self._entries[k] for k in sorted(self._entries)]

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    async def aclose(self) -> None:
        """Close provider connections this catalogue's models hold."""
        models = [m for e in self._entries.values() for m in (e.sync_model, e.async_model)]
        await close_clients(m for m in models if m is not None)
