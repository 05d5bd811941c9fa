"""The operator's OpenAI-compatible endpoints, as an llm plugin of vibectld's own.

llm's OpenAI models build a new client, with a new connection pool, on every
prompt, and let the openai package retry 429s and 5xx while sleeping through
`retry-after`. A proxy must do neither. The async model of each endpoint, the
one the daemon calls, is aiohttp_chat.AiohttpAsyncChat: one session per
endpoint, no retries, and a fraction of the openai package's CPU per call. The
sync model (only for llm's own tools; the daemon never picks it when an async
one exists) and llm's stock OpenAI models keep the openai package, with one
pooled client per key and its retries off.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from typing import Any

import llm
from llm.default_plugins.openai_models import Chat

from vibectld.config import OpenAICompatibleModel
from vibectld.providers.aiohttp_chat import AiohttpAsyncChat, SessionPool

PLUGIN_NAME = "vibectld-openai-compatible"


class _ClientPool:
    """One openai client per (key, sync/async), created on first use."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str | None, bool], Any] = {}

    def get(self, key: str | None, async_: bool, make: Any) -> Any:
        client = self._clients.get((key, async_))
        if client is None:
            client = make().with_options(max_retries=0)
            self._clients[(key, async_)] = client
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            closed = client.close()
            if inspect.isawaitable(closed):
                await closed


class _Pooled:
    """Mixed in before llm's Chat classes: their get_client, but pooled and without retries."""

    pool: _ClientPool

    def get_client(self, key: Any, *, async_: bool = False) -> Any:
        parent = super()
        return self.pool.get(key, async_, lambda: parent.get_client(key, async_=async_))  # type: ignore[attr-defined]


class PooledChat(_Pooled, Chat):  # type: ignore[misc]
    pass


def pool_clients(model: Any) -> None:
    """Give one of llm's stock OpenAI models (built by llm itself) the same pooled clients.

    llm constructs these instances in its own plugin; rather than re-create
    them with every constructor option they were given, the instance's
    get_client is wrapped, which changes nothing but where the client comes from.
    """
    if hasattr(model, "pool") or not callable(getattr(model, "get_client", None)):
        return
    original = model.get_client
    pool = _ClientPool()

    def get_client(key: Any, *, async_: bool = False) -> Any:
        return pool.get(key, async_, lambda: original(key, async_=async_))

    model.get_client = get_client
    model.pool = pool


def key_env_var(key_name: str | None) -> str | None:
    """The environment variable for an endpoint's key: gpu-box -> GPU_BOX_API_KEY."""
    if key_name is None:
        return None
    return re.sub(r"[^A-Z0-9]", "_", key_name.upper()) + "_API_KEY"


class OpenAICompatiblePlugin:
    """Registers one sync and one async model per configured endpoint."""

    def __init__(self, endpoints: Iterable[OpenAICompatibleModel]) -> None:
        self.endpoints = tuple(endpoints)

    @llm.hookimpl
    def register_models(self, register: Any) -> None:
        for ep in self.endpoints:
            kwargs: dict[str, Any] = {
                "model_name": ep.model_name,
                "api_base": ep.api_base,
                "supports_schema": True,
            }
            sync_model: Any = PooledChat(ep.model_id, **kwargs)  # type: ignore[no-untyped-call]
            sync_model.pool = _ClientPool()
            async_model = AiohttpAsyncChat(ep.model_id, **kwargs)
            for model in (sync_model, async_model):
                # None: the endpoint takes no key. The classes' defaults would
                # demand, and fall back to, the operator's OpenAI key.
                model.needs_key = ep.api_key_name
                model.key_env_var = key_env_var(ep.api_key_name)
            register(sync_model, async_model)


async def close_clients(models: Iterable[Any]) -> None:
    """Close the pooled connections of the given llm models."""
    for model in models:
        pool = getattr(model, "pool", None)
        if isinstance(pool, _ClientPool | SessionPool):
            await pool.aclose()
