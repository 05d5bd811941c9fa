"""LLMModelAdapter: model calls straight through the llm library, with the user's own keys."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import llm

from vibectl.adapters.base import LLMMetrics, ModelAdapter, Prompt
from vibectl.errors import ModelError
from vibectl.model_errors import ErrorCode, KeyOwner, classify


def _failure(exc: Exception, model: Any) -> ModelError:
    """The shared classification (the daemon's too), worded for the user's own key."""
    return ModelError(*classify(exc, model.model_id, _your_key(model)))


def _your_key(model: Any) -> KeyOwner:
    if not model.needs_key:
        return KeyOwner("your", "check the model's plugin settings")
    remedy = f"set it with: llm keys set {model.needs_key}"
    if getattr(model, "key_env_var", None):
        remedy += f" (or the {model.key_env_var} environment variable)"
    return KeyOwner("your", remedy)


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
                ErrorCode.MODEL_NOT_FOUND,
                f"model '{wanted}' is not installed; list models with: vibectl models",
            ) from None

    @staticmethod
    def _missing_key(model: Any) -> Exception | None:
        """llm's own complaint (it names the command that fixes it) if the key is missing."""
        if not model.needs_key:
            return None
        try:
            model.get_key()
        except llm.NeedsKeyException as e:
            return e
        return None

    def _prompt(self, model: Any, prompt: Prompt) -> Any:
        # A missing key is found before the call and classified as a provider's refusal
        # would be, so it reads PROVIDER_AUTH_ERROR here as it does through the proxy.
        missing = self._missing_key(model)
        if missing is not None:
            raise _failure(missing, model) from None
        try:
            return model.prompt(
                None,
                fragments=prompt.user_fragments,
                system_fragments=prompt.system_fragments,
                schema=prompt.schema,
            )
        except ValueError as e:
            raise ModelError(ErrorCode.SCHEMA_NOT_SUPPORTED, str(e)) from None

    async def _execute(self, model: Any, prompt: Prompt) -> tuple[str, LLMMetrics]:
        started = time.monotonic()
        response = self._prompt(model, prompt)
        try:
            if isinstance(response, llm.AsyncResponse):
                text = await response.text()
                usage = await response.usage()
            else:
                text = response.text()
                usage = response.usage()
        except ModelError:
            raise
        except Exception as e:
            raise _failure(e, model) from e
        metrics = LLMMetrics(
            latency_ms=(time.monotonic() - started) * 1000,
            token_input=usage.input,
            token_output=usage.output,
            model=model.model_id,
        )
        return text, metrics

    async def _stream(self, model: Any, prompt: Prompt) -> AsyncIterator[str]:
        response = self._prompt(model, prompt)
        try:
            if isinstance(response, llm.AsyncResponse):
                async for chunk in response:
                    yield chunk
            else:
                for chunk in response:
                    yield chunk
        except ModelError:
            raise
        except Exception as e:
            raise _failure(e, model) from e

    def validate_model_key(self, name: str | None) -> str | None:
        missing = self._missing_key(self.get_model(name))
        return None if missing is None else str(missing)

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
