"""The ModelAdapter interface every way of calling a model implements."""

from __future__ import annotations

import abc
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class LLMMetrics:
    """What one model call cost."""

    latency_ms: float = 0.0
    token_input: int | None = None
    token_output: int | None = None
    cost_usd: float | None = None
    model: str | None = None

    @property
    def total_tokens(self) -> int | None:
        if self.token_input is None and self.token_output is None:
            return None
        return (self.token_input or 0) + (self.token_output or 0)


# A pydantic model class (anything with model_json_schema()) or a JSON schema as a dict.
ResponseModel = Any


def schema_of(response_model: ResponseModel | None) -> dict[str, Any] | None:
    """The JSON schema for a response model, without importing pydantic."""
    if response_model is None:
        return None
    if isinstance(response_model, dict):
        return response_model
    if isinstance(response_model, str):
        parsed = json.loads(response_model)
        if not isinstance(parsed, dict):
            raise ValueError("a response schema must be a JSON object")
        return parsed
    schema = response_model.model_json_schema()
    assert isinstance(schema, dict)
    return schema


class ModelAdapter(abc.ABC):
    """Runs prompts on a model. Fragments stay separate: system ones are the system prompt."""

    #: "direct" or "proxy", for messages and `vibectl models`.
    mode: str

    @abc.abstractmethod
    def get_model(self, name: str | None) -> Any:
        """A handle for the named model (None: the default one)."""

    @abc.abstractmethod
    async def execute(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None = None,
    ) -> tuple[str, LLMMetrics]:
        """The whole reply and what it cost."""

    async def execute_and_log_metrics(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None = None,
    ) -> tuple[str, LLMMetrics]:
        """Like execute(), also logging the metrics at debug level."""
        import logging

        text, metrics = await self.execute(model, system_fragments, user_fragments, response_model)
        logging.getLogger("vibectl.metrics").debug(
            "model=%s latency_ms=%.1f tokens_in=%s tokens_out=%s",
            metrics.model,
            metrics.latency_ms,
            metrics.token_input,
            metrics.token_output,
        )
        return text, metrics

    @abc.abstractmethod
    def stream_execute(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None = None,
    ) -> AsyncIterator[str]:
        """The reply as text chunks, as they arrive."""

    @abc.abstractmethod
    def validate_model_key(self, name: str | None) -> str | None:
        """None if the model's key is in place, else a message saying how to add it."""

    @abc.abstractmethod
    async def validate_model_name(self, name: str) -> str | None:
        """None if the model exists, else a message naming what does."""

    @abc.abstractmethod
    async def list_models(self) -> list[dict[str, Any]]:
        """The models on offer: dicts with model_id, provider, aliases, default."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
