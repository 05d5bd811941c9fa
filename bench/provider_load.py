"""A load generator that calls an OpenAI-compatible endpoint without vibectld.

It is the other half of the provider comparison: the same closed loop as bench.load
(see bench/loadgen.py), but each call goes straight to the endpoint, one of:

- `raw`: aiohttp, the HTTP client vibectld itself uses for these endpoints: one
  ClientSession with a kept-alive connection pool for the whole run; the JSON reply
  or the SSE stream is parsed, nothing else. The floor of what a Python client pays.
- `httpx`: the same with httpx (the `httpx2` distribution the openai package is
  built on here), to show what the choice of HTTP library costs.
- `llm-pooled`: the llm library in this process, the model registered exactly as
  vibectld registers `models.openai_compatible` endpoints (vibectld's own llm plugin,
  `vibectld.providers.openai_compatible`: one aiohttp session per endpoint, no hidden retries),
  called as vibectld's executor calls it.
- `llm-stock`: llm's stock `AsyncChat` with `api_base`, as llm's
  `extra-openai-models.yaml` would register it: a new `openai` client (and SSL
  context, and connection) per prompt. The naive cost vibectld must not inherit.

    python -m bench.provider_load --api-base http://127.0.0.1:P/v1 --path raw \\
        --mode unary --callers 16 --duration 5 --json

Set LLM_USER_PATH to a scratch directory for the llm paths.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

from bench import loadgen
from bench.loadgen import CallFailed, RunSpec

PATHS = ("raw", "httpx", "llm-pooled", "llm-stock")
MODEL_ID = "fake-gpt"
MODEL_NAME = "fake"
PROMPT = "hello"

Closer = Callable[[], Awaitable[None]]


def _first_text(line: str) -> tuple[str | None, bool]:
    """(the text of one SSE line's first choice, whether the stream ended)."""
    if not line.startswith("data:"):
        return None, False
    data = line[5:].strip()
    if data == "[DONE]":
        return None, True
    event = json.loads(data)
    choices = event.get("choices") or []
    if not choices:
        return None, False
    return (choices[0].get("delta") or {}).get("content"), False


def raw_client(api_base: str, spec: RunSpec) -> tuple[loadgen.CallFn, Closer]:
    """The raw client the provider targets compare vibectld with (aiohttp)."""
    import aiohttp

    session: aiohttp.ClientSession | None = None
    url = f"{api_base}/chat/completions"
    messages = [{"role": "user", "content": PROMPT}]
    headers = {"authorization": "Bearer unused"}

    async def call(index: int, n: int) -> float:
        nonlocal session
        if session is None:  # made inside the loop that will use it
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=spec.callers),
                timeout=aiohttp.ClientTimeout(total=spec.call_timeout),
                headers=headers,
            )
        t0 = time.perf_counter()
        try:
            if spec.mode == "unary":
                body: dict[str, Any] = {"model": MODEL_NAME, "messages": messages}
                async with session.post(url, json=body) as reply:
                    if reply.status != 200:
                        raise CallFailed("error", f"HTTP {reply.status}")
                    data = json.loads(await reply.read())
                if not data["choices"][0]["message"]["content"]:
                    raise CallFailed("error", "empty reply")
                return 0.0
            body = {"model": MODEL_NAME, "messages": messages, "stream": True}
            first: float | None = None
            done = False
            async with session.post(url, json=body) as reply:
                if reply.status != 200:
                    raise CallFailed("error", f"HTTP {reply.status}")
                async for raw_line in reply.content:
                    text, ended = _first_text(raw_line.decode())
                    done = done or ended
                    if text and first is None:
                        first = time.perf_counter() - t0
            if first is None or not done:
                raise CallFailed("error", f"bad stream: first text {first}, [DONE] {done}")
            return first
        except (aiohttp.ClientError, TimeoutError) as e:
            raise CallFailed("error", f"{type(e).__name__}: {e}") from None

    async def close() -> None:
        if session is not None:
            await session.close()

    return call, close


def _httpx(api_base: str, spec: RunSpec) -> tuple[loadgen.CallFn, Closer]:
    import httpx2

    limits = httpx2.Limits(max_connections=spec.callers, max_keepalive_connections=spec.callers)
    client = httpx2.AsyncClient(
        base_url=api_base,
        limits=limits,
        timeout=spec.call_timeout,
        headers={"authorization": "Bearer unused"},
    )
    messages = [{"role": "user", "content": PROMPT}]

    async def call(index: int, n: int) -> float:
        t0 = time.perf_counter()
        try:
            if spec.mode == "unary":
                reply = await client.post(
                    "/chat/completions", json={"model": MODEL_NAME, "messages": messages}
                )
                if reply.status_code != 200:
                    raise CallFailed("error", f"HTTP {reply.status_code}: {reply.text[:200]}")
                if not reply.json()["choices"][0]["message"]["content"]:
                    raise CallFailed("error", "empty reply")
                return 0.0
            body = {"model": MODEL_NAME, "messages": messages, "stream": True}
            first: float | None = None
            done = False
            async with client.stream("POST", "/chat/completions", json=body) as reply:
                if reply.status_code != 200:
                    raise CallFailed("error", f"HTTP {reply.status_code}")
                async for line in reply.aiter_lines():
                    text, ended = _first_text(line)
                    done = done or ended
                    if text and first is None:
                        first = time.perf_counter() - t0
            if first is None or not done:
                raise CallFailed("error", f"bad stream: first text {first}, [DONE] {done}")
            return first
        except httpx2.HTTPError as e:
            raise CallFailed("error", f"{type(e).__name__}: {e}") from None

    return call, client.aclose


def _llm_model(path: str, api_base: str) -> tuple[Any, Closer]:
    if path == "llm-pooled":
        import llm
        from llm.plugins import pm

        from vibectld.config import OpenAICompatibleModel
        from vibectld.providers.openai_compatible import (
            PLUGIN_NAME,
            OpenAICompatiblePlugin,
            close_clients,
        )

        endpoint = OpenAICompatibleModel(
            model_id=MODEL_ID, model_name=MODEL_NAME, api_base=api_base
        )
        pm.register(OpenAICompatiblePlugin([endpoint]), name=PLUGIN_NAME)
        pooled = llm.get_async_model(MODEL_ID)
        if type(pooled).__name__ != "AiohttpAsyncChat":
            raise SystemExit(f"provider_load: got {type(pooled).__name__}, not AiohttpAsyncChat")

        async def close() -> None:
            await close_clients([pooled])

        return pooled, close
    from llm.default_plugins.openai_models import AsyncChat

    # What llm's extra-openai-models.yaml registers for an entry with api_base.
    model: Any = AsyncChat(  # type: ignore[no-untyped-call]
        model_id=MODEL_ID, model_name=MODEL_NAME, api_base=api_base, supports_schema=True
    )
    model.needs_key = None

    async def nothing() -> None:
        return None

    return model, nothing


def _llm(path: str, api_base: str, spec: RunSpec) -> tuple[loadgen.CallFn, Closer]:
    model, close = _llm_model(path, api_base)

    async def call(index: int, n: int) -> float:
        t0 = time.perf_counter()
        try:
            # As vibectld's executor (vibectld/providers/execution.py) calls an async model.
            response = model.prompt(
                None,
                fragments=[PROMPT],
                system_fragments=[],
                schema=None,
                stream=spec.mode == "stream",
            )
            if spec.mode == "unary":
                text = await response.text()
                await response.usage()
                if not text:
                    raise CallFailed("error", "empty reply")
                return 0.0
            first: float | None = None
            async for chunk in response:
                if chunk and first is None:
                    first = time.perf_counter() - t0
            await response.usage()
            if first is None:
                raise CallFailed("error", "no text in the stream")
            return first
        except CallFailed:
            raise
        except Exception as e:
            raise CallFailed("error", f"{type(e).__name__}: {e}") from None

    return call, close


async def run_load(path: str, api_base: str, spec: RunSpec) -> loadgen.Result:
    if path == "raw":
        call, close = raw_client(api_base, spec)
    elif path == "httpx":
        call, close = _httpx(api_base, spec)
    else:
        call, close = _llm(path, api_base, spec)
    try:
        return await loadgen.run(call, spec)
    finally:
        await close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.provider_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--api-base", required=True, help="e.g. http://127.0.0.1:PORT/v1")
    parser.add_argument("--path", choices=PATHS, required=True, help="how to call it")
    loadgen.add_run_arguments(parser)
    args = parser.parse_args(argv)
    if not args.api_base.startswith("http://127."):
        parser.error("--api-base must be a loopback http:// URL")
    spec = loadgen.spec_from(args)
    result = asyncio.run(run_load(args.path, args.api_base, spec))
    print(json.dumps(asdict(result)) if args.json else result.line(), flush=True)
    sys.exit(0 if result.count else 1)


if __name__ == "__main__":
    main()
