"""The daemon's live parts, shared by the gRPC service and the admin routes.

What a reload replaces lives in one frozen `Generation`, swapped as a single
reference; a request handler reads `generation` once per call. What lives as
long as the process (the registry, the signing keys, the limiters, the calls in
flight, the thread pool, metrics) is held here directly.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

from vibectl.util.hostport import join_host_port
from vibectld.config import DaemonConfig
from vibectld.generation import Generation
from vibectld.ops.metrics import Metrics
from vibectld.pki.signing import SigningKeys
from vibectld.pki.tls import ServerTLS
from vibectld.providers.catalogue import ModelCatalogue
from vibectld.providers.execution import Executor
from vibectld.providers.keys import ProviderKeys
from vibectld.service.inflight import InFlight
from vibectld.service.limits import Limiter
from vibectld.store.base import Store


class WorkersView(Protocol):
    """The serving processes as the main process sees them (workers/supervisor.py)."""

    def rows(self) -> list[dict[str, Any]]:
        """One per worker: index, pid, state, started, restarts, in_flight."""
        ...

    def in_flight_by_client(self) -> Counter[str]: ...


class Admission(Protocol):
    """Who decides rpm and concurrency (and, for a worker, budgets) when this process
    cannot alone: the cluster limiter (service/cluster_limits.py, several nodes) or the
    main process (workers/view.py, a worker). A lease is whatever `admit` returned.
    Both restate these signatures; assigning either to `Runtime.cluster` checks them."""

    async def admit(
        self,
        client_id: str,
        rpm: int | None,
        concurrency: int | None,
        *,
        slot: bool,
        model_id: str | None = None,
    ) -> Any: ...

    def release(self, lease: Any) -> None: ...

    def holding(self, lease: Any) -> AbstractContextManager[None]: ...

    async def usd_spent_month(self, client_id: str, now: float) -> float | None:
        """The client's spend this UTC month where this process's store cannot know
        it (a worker's), or None: then the store's own figure is the answer."""
        ...


@dataclass
class Runtime:
    generation: Generation
    signing: SigningKeys
    registry: Store
    executor: Executor
    inflight: InFlight = field(default_factory=InFlight)
    limiter: Limiter = field(default_factory=Limiter)
    # rpm and concurrency across the nodes, when the store is shared, or from the main
    # process in a worker (else None: the limiter above decides alone).
    cluster: Admission | None = None
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
    # In a main process with workers: what they serve (the calls in flight are theirs);
    # None when this process serves alone.
    workers: WorkersView | None = None
    # In a worker: wraps the handler of each admitted call (method, handler) so that its
    # status goes once its usage is in the worker's own file and sent to the main
    # process (one turn of the worker's loop, no round trip: workers/journal_files.py).
    wrap_handler: Callable[[str, Any], Any] | None = None

    # Shorthands for code outside a call (admin status, logs). A call that reads
    # more than one of them takes `generation` once instead, so it cannot see two.
    @property
    def config(self) -> DaemonConfig:
        return self.generation.config

    @property
    def catalogue(self) -> ModelCatalogue:
        return self.generation.catalogue

    @property
    def tls(self) -> ServerTLS:
        return self.generation.tls

    @property
    def provider_keys(self) -> ProviderKeys:
        return self.generation.provider_keys

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
        return join_host_port(self.grpc_host, self.grpc_port)

    def dialable_host(self) -> str | None:
        """The bound host as a client on this machine can dial it; None for a wildcard."""
        host = self.grpc_host.strip("[]")
        return None if host in ("0.0.0.0", "::", "") else host  # noqa: S104 - comparing
