"""Test models, registered through llm's own plugin registry (never by patching llm).

`fake-sync` only has a synchronous implementation, to exercise the thread pool.
`faults` behaves as its prompt says, to produce provider failures on demand:
  "fail"         raises a provider error
  "ratelimit"    raises an error with status_code 429
  "timeout"      raises a provider timeout error
  "sleep:S"      waits S seconds, then answers
  "chunks:N"     streams N chunks "c0 " … with a short pause between them
  anything else  answers "faults says: <prompt>"
It supports schemas: with one, it answers with a JSON object.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any

import llm


class ProviderError(Exception):
    pass


class RateLimitError(Exception):
    status_code = 429


class APITimeoutError(Exception):
    pass


class FakeSync(llm.Model):
    model_id = "fake-sync"
    can_stream = True

    def execute(self, prompt: Any, stream: bool, response: Any, conversation: Any) -> Iterator[str]:
        text = prompt.prompt
        for word in text.split(" "):
            if word == "sleep":
                time.sleep(0.5)
            yield word + " "
        response.set_usage(input=len(text.split()), output=len(text.split()))


class Faults(llm.AsyncModel):
    model_id = "faults"
    can_stream = True
    supports_schema = True

    async def execute(
        self, prompt: Any, stream: bool, response: Any, conversation: Any
    ) -> AsyncGenerator[str, None]:
        text = prompt.prompt
        response.set_usage(input=len(text.split()), output=3)
        if prompt.schema:
            yield json.dumps({"answer": text, "system": prompt.system})
            return
        if text == "fail":
            raise ProviderError("upstream exploded")
        if text == "ratelimit":
            raise RateLimitError("slow down")
        if text == "timeout":
            raise APITimeoutError("upstream timed out")
        if text.startswith("sleep:"):
            await asyncio.sleep(float(text.split(":", 1)[1]))
            yield "slept"
            return
        if text.startswith("chunks:"):
            for i in range(int(text.split(":", 1)[1])):
                yield f"c{i} "
                await asyncio.sleep(0.01)
            return
        yield f"faults says: {text}"


class FaultsSync(llm.Model):
    """llm requires a sync model beside every async one; the daemon prefers the async one."""

    model_id = "faults"
    can_stream = True
    supports_schema = True

    def execute(self, prompt: Any, stream: bool, response: Any, conversation: Any) -> Iterator[str]:
        yield "faults (sync) was used"


@llm.hookimpl
def register_models(register: Any) -> None:
    register(FakeSync())
    register(FaultsSync(), Faults(), aliases=("faulty",))
