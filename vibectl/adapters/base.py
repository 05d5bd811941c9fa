"""The ModelAdapter interface every way of calling a model implements."""

from __future__ import annotations

import abc
import functools
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ParamSpec

from vibectl.redaction import Redactor, default_redactor, summary

P = ParamSpec("P")


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


@dataclass(frozen=True)
class Prompt:
    """One request to a model: system and user fragments kept apart, and the reply's schema."""

    system_fragments: list[str]
    user_fragments: list[str]
    schema: dict[str, Any] | None = None


Reply = tuple[str, LLMMetrics]
# Told how many secrets of which kinds were replaced in a request (never their values).
RedactionNotice = Callable[[Counter[str]], None]


def log_redactions(counts: Counter[str]) -> None:
    """The library's default notice: a warning on the `vibectl.redaction` logger."""
    logging.getLogger("vibectl.redaction").warning("redacted %s before sending", summary(counts))


_Execute = Callable[P, Awaitable[Reply]]


def _logging_metrics(execute: _Execute[P]) -> _Execute[P]:
    """`execute`, also logging what each call cost at debug level."""

    @functools.wraps(execute)
    async def logged(*args: P.args, **kwargs: P.kwargs) -> Reply:
        text, metrics = await execute(*args, **kwargs)
        logging.getLogger("vibectl.metrics").debug(
            "model=%s latency_ms=%.1f tokens_in=%s tokens_out=%s",
            metrics.model,
            metrics.latency_ms,
            metrics.token_input,
            metrics.token_output,
        )
        return text, metrics

    return logged


class ModelAdapter(abc.ABC):
    """Runs prompts on a model. Fragments stay separate: system ones are the system prompt.

    The public methods have the interface's signature; an adapter implements only
    `_execute` and `_stream`, which receive the request as one `Prompt`.
    """

    #: "direct" or "proxy", for messages and `vibectl models`.
    mode: str
    #: Secrets in every fragment are replaced before a request leaves, unless `redact` is
    #: False (`vibectl ask --no-redact`, `redaction.enabled: false`). `redactor` None is
    #: the shared Redactor with every built-in detector.
    redact: bool = True
    redactor: Redactor | None = None
    #: Called with the counts per kind when a request had secrets replaced.
    on_redacted: RedactionNotice = staticmethod(log_redactions)
    #: What the last request had replaced, per kind (empty when nothing was).
    last_redactions: Counter[str] = Counter()  # noqa: RUF012 - replaced per call, never mutated

    @abc.abstractmethod
    def get_model(self, name: str | None) -> Any:
        """A handle for the named model (None: the default one)."""

    async def execute(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None = None,
    ) -> Reply:
        """The whole reply and what it cost."""
        return await self._execute(
            model, self._outgoing(system_fragments, user_fragments, response_model)
        )

    execute_and_log_metrics = _logging_metrics(execute)

    def stream_execute(
        self,
        model: Any,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None = None,
    ) -> AsyncIterator[str]:
        """The reply as text chunks, as they arrive."""
        return self._stream(model, self._outgoing(system_fragments, user_fragments, response_model))

    def _outgoing(
        self,
        system_fragments: Sequence[str],
        user_fragments: Sequence[str],
        response_model: ResponseModel | None,
    ) -> Prompt:
        """The request as it leaves: the one place where every fragment is redacted."""
        system, user = list(system_fragments), list(user_fragments)
        counts: Counter[str] = Counter()
        if self.redact:
            redactor = self.redactor or default_redactor()
            system, in_system = redactor.redact_all(system)
            user, in_user = redactor.redact_all(user)
            counts = in_system + in_user
        self.last_redactions = counts
        if counts:
            self.on_redacted(counts)
        return Prompt(system, user, schema_of(response_model))

    @abc.abstractmethod
    async def _execute(self, model: Any, prompt: Prompt) -> Reply:
        """The whole reply to `prompt` and what it cost."""

    @abc.abstractmethod
    def _stream(self, model: Any, prompt: Prompt) -> AsyncIterator[str]:
        """The reply to `prompt` as text chunks, as they arrive."""

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
