"""LLMModelAdapter: model calls straight through the llm library, with the user's own keys."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import llm

from vibectl.adapters.base import LLMMetrics, ModelAdapter, ResponseModel, schema_of
from vibectl.errors import ConfigurationError, ModelError


def _failure(exc: Exception, model_id: str) -> ModelError:
    name = type(exc).__name__
    status = getattr(exc, "status_code", None)
    if status == 429 or "RateLimit" in name:
        return ModelError("PROVIDER_RATE_LIMITED", f"'{model_id}' is rate-limited: {exc}")
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return ModelError("PROVIDER_TIMEOUT", f"'{model_id}' did not answer in time: {exc}")
    return ModelError("PROVIDER_ERROR", f"'{model_id}' failed: {exc}")


def _llm_default() -> str:
    return str(llm.get_default_model())  # type: ignore[no-untyped-call]


class LLMModelAdapter(ModelAdapter):
    mode = "direct"

    def __init__(self, default_model: str | None = None) -> None:
        self._default = default_model

    def get_model(self, name: str | None) -> Any:
        wanted = name or self._default or _llm_default()
        try:
            return llm.get_async_model(wanted)
        except llm.UnknownModelError:
            pass
        try:
            return llm.get_model(wanted)
        except llm.UnknownModelError:
            raise ModelError(
                "MODEL_NOT_FOUND",
                f"model '{wanted}' is not installed; list models with: vibectl models",
            ) from None

    def _key_problem(self, model: Any) -> str | None:
        if not model.needs_key:
            return None
        try:
            model.get_key()
        except llm.NeedsKeyException as e:
            return str(e)
        return None

    def _prompt(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None,
    ) -> Any:
        problem = self._key_problem(model)
        if problem:
            raise ConfigurationError(problem)
        try:
            return model.prompt(
                None,
                fragments=list(user_fragments),
                system_fragments=list(system_fragments),
                schema=schema_of(response_model),
            )
        except ValueError as e:
            raise ModelError("SCHEMA_NOT_SUPPORTED", str(e)) from None

    async def execute(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None = None,
    ) -> tuple[str, LLMMetrics]:
        started = time.monotonic()
        response = self._prompt(model, system_fragments, user_fragments, response_model)
        try:
            if isinstance(response, llm.AsyncResponse):
                text = await response.text()
                usage = await response.usage()
            else:
                text = response.text()
                usage = response.usage()
        except (ModelError, ConfigurationError):
            raise
        except Exception as e:
            raise _failure(e, model.model_id) from e
        metrics = LLMMetrics(
            latency_ms=(time.monotonic() - started) * 1000,
            token_input=usage.input,
            token_output=usage.output,
            model=model.model_id,
        )
        return text, metrics

    async def stream_execute(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None = None,
    ) -> AsyncIterator[str]:
        response = self._prompt(model, system_fragments, user_fragments, response_model)
        try:
            if isinstance(response, llm.AsyncResponse):
                async for chunk in response:
                    yield chunk
            else:
                for chunk in response:
                    yield chunk
        except (ModelError, ConfigurationError):
            raise
        except Exception as e:
            raise _failure(e, model.model_id) from e

    def validate_model_key(self, name: str | None) -> str | None:
        return self._key_problem(self.get_model(name))

    async def validate_model_name(self, name: str) -> str | None:
        try:
            self.get_model(name)
        except ModelError as e:
            return e.message
        return None

    async def list_models(self) -> list[dict[str, Any]]:
        default = self._default or _llm_default()
        models = []
        for mwa in llm.get_models_with_aliases():
            model = mwa.model or mwa.async_model
            models.append(
                {
                    "model_id": model.model_id,
                    "provider": type(model).__module__.split(".")[0],
                    "aliases": sorted(mwa.aliases),
                    "default": model.model_id == default,
                }
            )
        return models
