"""The targets a load generator calls, and how one call to each is made and checked.

A target is vibectld or the floor over gRPC (`client=grpc`, the default), or an
OpenAI-compatible endpoint called without vibectld, one of:

- `raw`: aiohttp, the HTTP client vibectld itself uses for these endpoints: one
  ClientSession with a kept-alive connection pool for the whole run; the JSON reply
  or the SSE stream is parsed, nothing else. The floor of what a Python client pays.
- `httpx`: the same with httpx (the `httpx2` distribution the openai package is
  built on here), to show what the choice of HTTP library costs.
- `llm-pooled`: the llm library in this process, the model registered exactly as
  vibectld registers `models.openai_compatible` endpoints (vibectld's own llm plugin,
  `vibectld.providers.openai_compatible`: one aiohttp session per endpoint, no hidden
  retries), called as vibectld's executor calls it.
- `llm-stock`: llm's stock `AsyncChat` with `api_base`, as llm's
  `extra-openai-models.yaml` would register it: a new `openai` client (and SSL
  context, and connection) per prompt. The naive cost vibectld must not inherit.

A call returns its time to the first text (streams) or 0.0, and raises `CallFailed`
when it did not succeed. A RESOURCE_EXHAUSTED refusal (a limit) is kind "refused", so
an abusive client can be driven past its limit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.result import CallFailed
from vibectl._proto import llm_proxy_pb2 as pb
from vibectl._proto import llm_proxy_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
SECRET_ENV = "VIBECTLD_BENCH_SECRET"  # noqa: S105 - the variable's name, not a secret
HTTP_CLIENTS = ("raw", "httpx", "llm-pooled", "llm-stock")
MODEL_ID = "fake-gpt"  # what the llm paths register the endpoint as
MODEL_NAME = "fake"  # the model named in the HTTP requests
PROMPT = "hello"

# (caller index, request number) -> time to first text in seconds (0.0 for unary calls).
CallFn = Callable[[int, int], Awaitable[float]]
Closer = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class Target:
    """One server to call, and how (see the module's docstring)."""

    name: str
    client: str = "grpc"
    port: int = 0
    ca: Path | None = None
    secret: str = ""
    model: str = "echo"
    channels: int = 1
    api_base: str = ""
    pid: int | None = None  # the server's, for its CPU time per request


def parse_target(text: str) -> Target:
    """`name=N,port=P,ca=FILE[,secret-env=VAR][,model=M][,channels=C][,pid=PID]` (gRPC) or
    `name=N,client=raw|httpx|llm-pooled|llm-stock,api-base=URL[,pid=PID]` (HTTP)."""
    try:
        fields = dict(part.split("=", 1) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE,... in {text!r}") from None
    known = {"name", "client", "port", "ca", "secret-env", "model", "channels", "api-base", "pid"}
    if unknown := set(fields) - known:
        raise argparse.ArgumentTypeError(f"unknown target field(s) {', '.join(sorted(unknown))}")
    client = fields.get("client", "grpc")
    name = fields.get("name", client)
    pid = int(fields["pid"]) if fields.get("pid") else None
    if client in HTTP_CLIENTS:
        api_base = fields.get("api-base", "")
        if not api_base.startswith("http://127."):
            raise argparse.ArgumentTypeError("api-base must be a loopback http:// URL")
        return Target(name, client, api_base=api_base, pid=pid)
    if client != "grpc" or not fields.get("port", "").isdigit() or "ca" not in fields:
        raise argparse.ArgumentTypeError(f"a gRPC target needs port= and ca= (in {text!r})")
    env = fields.get("secret-env", SECRET_ENV)
    if not (secret := os.environ.get(env)):
        raise argparse.ArgumentTypeError(f"set {env} to the client secret")
    channels = int(fields.get("channels", "1"))
    model = fields.get("model", "echo")
    port, ca = int(fields["port"]), Path(fields["ca"])
    return Target(name, "grpc", port, ca, secret, model, channels, pid=pid)


async def connect(
    target: Target, mode: str, callers: int, call_timeout: float
) -> tuple[CallFn, Closer]:
    """A ready call function for the target (its connections made), and its closer."""
    if target.client == "grpc":
        return await _grpc(target, mode, min(target.channels, callers), call_timeout)
    if target.client == "raw":
        return _raw(target.api_base, mode, callers, call_timeout)
    if target.client == "httpx":
        return _httpx(target.api_base, mode, callers, call_timeout)
    return _llm(target.client, target.api_base, mode)


async def _grpc(
    target: Target, mode: str, channels: int, call_timeout: float
) -> tuple[CallFn, Closer]:
    assert target.ca is not None
    creds = grpc.ssl_channel_credentials(root_certificates=target.ca.read_bytes())
    # A local subchannel pool gives every channel its own connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    address = f"{HOST}:{target.port}"
    chans = [grpc.aio.secure_channel(address, creds, options=options) for _ in range(channels)]

    async def close() -> None:
        await asyncio.gather(*(c.close() for c in chans))

    try:
        async with asyncio.timeout(10):
            await asyncio.gather(*(c.channel_ready() for c in chans))
    except BaseException:
        await close()
        raise
    stubs = [pb_grpc.VibectlLLMProxyStub(c) for c in chans]
    metadata = (("authorization", f"Bearer {target.secret}"),)

    async def call(index: int, n: int) -> float:
        stub = stubs[index % len(stubs)]
        request = pb.ExecuteRequest(
            user_fragments=[PROMPT], model_name=target.model, request_id=f"bench-{index}-{n}"
        )
        t0 = time.perf_counter()
        try:
            if mode == "unary":
                reply = await stub.Execute(request, metadata=metadata, timeout=call_timeout)
                if reply.WhichOneof("result") != "success":
                    raise CallFailed("error", f"in-band error: {reply.error.error_code}")
                return 0.0
            stream = stub.StreamExecute(request, metadata=metadata, timeout=call_timeout)
            first: float | None = None
            seen: list[str] = []
            while True:
                chunk = await stream.read()
                if chunk is grpc.aio.EOF:
                    break
                kind = chunk.WhichOneof("chunk_type")
                if kind == "text_chunk":
                    # The first text: an empty chunk (a role-only delta) does not count.
                    if first is None and chunk.text_chunk:
                        first = time.perf_counter() - t0
                else:
                    seen.append(kind)
            if first is None or seen != ["complete", "final_metrics"]:
                raise CallFailed("error", f"bad stream: first text {first}, then {seen}")
            return first
        except grpc.aio.AioRpcError as e:
            kind = "refused" if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "error"
            raise CallFailed(kind, f"{e.code().name}: {e.details()}") from None

    return call, close


def _body(mode: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}]}
    if mode == "stream":
        body["stream"] = True
    return body


async def _sse_first_text(status: int, lines: AsyncIterable[Any], t0: float) -> float:
    """Read an SSE reply to its end; the seconds from t0 to its first text."""
    if status != 200:
        raise CallFailed("error", f"HTTP {status}")
    first: float | None = None
    done = False
    async for raw in lines:
        line = raw.decode() if isinstance(raw, bytes) else raw
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            done = True
            continue
        choices = json.loads(data).get("choices") or []
        text = (choices[0].get("delta") or {}).get("content") if choices else None
        if text and first is None:
            first = time.perf_counter() - t0
    if first is None or not done:
        raise CallFailed("error", f"bad stream: first text {first}, [DONE] {done}")
    return first


def _check_reply(status: int, data: Any) -> float:
    if status != 200:
        raise CallFailed("error", f"HTTP {status}")
    if not data["choices"][0]["message"]["content"]:
        raise CallFailed("error", "empty reply")
    return 0.0


def _raw(api_base: str, mode: str, callers: int, call_timeout: float) -> tuple[CallFn, Closer]:
    """The raw client the provider targets compare vibectld with (aiohttp)."""
    import aiohttp

    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=callers),
        timeout=aiohttp.ClientTimeout(total=call_timeout),
        headers={"authorization": "Bearer unused"},
    )
    url = f"{api_base}/chat/completions"
    body = _body(mode)

    async def call(index: int, n: int) -> float:
        t0 = time.perf_counter()
        try:
            async with session.post(url, json=body) as reply:
                if mode == "stream":
                    return await _sse_first_text(reply.status, reply.content, t0)
                data = json.loads(await reply.read()) if reply.status == 200 else None
            return _check_reply(reply.status, data)
        except (aiohttp.ClientError, TimeoutError) as e:
            raise CallFailed("error", f"{type(e).__name__}: {e}") from None

    return call, session.close


def _httpx(api_base: str, mode: str, callers: int, call_timeout: float) -> tuple[CallFn, Closer]:
    import httpx2

    client = httpx2.AsyncClient(
        base_url=api_base,
        limits=httpx2.Limits(max_connections=callers, max_keepalive_connections=callers),
        timeout=call_timeout,
        headers={"authorization": "Bearer unused"},
    )
    body = _body(mode)

    async def call(index: int, n: int) -> float:
        t0 = time.perf_counter()
        try:
            if mode == "stream":
                async with client.stream("POST", "/chat/completions", json=body) as reply:
                    return await _sse_first_text(reply.status_code, reply.aiter_lines(), t0)
            reply = await client.post("/chat/completions", json=body)
            return _check_reply(
                reply.status_code, reply.json() if reply.status_code == 200 else None
            )
        except httpx2.HTTPError as e:
            raise CallFailed("error", f"{type(e).__name__}: {e}") from None

    return call, client.aclose


def _llm_model(client: str, api_base: str) -> tuple[Any, Closer]:
    if client == "llm-pooled":
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
            raise SystemExit(f"bench.load: got {type(pooled).__name__}, not AiohttpAsyncChat")

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


def _llm(client: str, api_base: str, mode: str) -> tuple[CallFn, Closer]:
    model, close = _llm_model(client, api_base)

    async def call(index: int, n: int) -> float:
        t0 = time.perf_counter()
        try:
            # As vibectld's executor (vibectld/providers/execution.py) calls an async model.
            response = model.prompt(
                None, fragments=[PROMPT], system_fragments=[], schema=None, stream=mode == "stream"
            )
            if mode == "unary":
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
