"""The daemon's live parts, shared by the gRPC service and the admin routes.

A reload replaces `config`, `catalogue` and `tls` as a whole; request handlers
read each once per call, so a call never sees half of an old and half of a new
configuration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from vibectld.config import DaemonConfig
from vibectld.ops.metrics import Metrics
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import ServerTLS
from vibectld.providers.catalogue import ModelCatalogue
from vibectld.providers.execution import Executor
from vibectld.providers.keys import ProviderKeys
from vibectld.service.auth import Authenticator
from vibectld.service.inflight import InFlight
from vibectld.service.limits import Limiter
from vibectld.store.registry import ClientRecord, Registry


@dataclass
class Runtime:
    config: DaemonConfig
    catalogue: ModelCatalogue
    signing: SigningKeys
    registry: Registry
    executor: Executor
    provider_keys: ProviderKeys
    tls: ServerTLS
    inflight: InFlight = field(default_factory=InFlight)
    auth: Authenticator = field(default_factory=Authenticator)
    limiter: Limiter = field(default_factory=Limiter)
    metrics: Metrics = field(default_factory=Metrics)
    started_at: float = field(default_factory=time.time)
    # Where the gRPC port is really bound (port 0 resolved); host as in server.listen.
    grpc_host: str = ""
    grpc_port: int = 0
    _background: set[asyncio.Task[Any]] = field(default_factory=set)
    # Set when shutting down: new calls are refused with a retryable UNAVAILABLE.
    draining: bool = False
    # time.monotonic() of the last call that arrived, to know when arrivals stop.
    last_arrival: float = 0.0

    def background(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run `coro` as a task the runtime keeps a reference to until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def cancel_background(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    @property
    def grpc_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    def dialable_host(self) -> str | None:
        """The bound host as a client on this machine can dial it; None for a wildcard."""
        host = self.grpc_host.strip("[]")
        return None if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - comparing

    def cost_usd(
        self, model_id: str, input_tokens: int | None, output_tokens: int | None
    ) -> float | None:
        """What a call cost, where `models.prices` has a price for the model."""
        price = self.config.models.prices.get(model_id)
        if price is None:
            return None
        return ((input_tokens or 0) * price.input + (output_tokens or 0) * price.output) / 1e6

    def effective_limits(self, client: ClientRecord) -> dict[str, int | None]:
        """The limits that apply to one client: its own overrides, else the defaults."""
        limits = self.config.limits
        return {
            "rpm": client.rpm if client.rpm is not None else limits.requests_per_minute,
            "concurrency": (
                client.concurrency if client.concurrency is not None else limits.concurrent_requests
            ),
            "tokens_per_day": (
                client.tokens_per_day
                if client.tokens_per_day is not None
                else limits.tokens_per_day
            ),
            "max_input_chars": limits.max_input_chars,
            "request_timeout_seconds": limits.request_timeout_seconds,
        }
