"""A worker's place in the main process, and the calls in flight as the workers report them."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from vibectld.service.inflight import InFlight
from vibectld.workers.channel import Channel


@dataclass
class WorkerSlot:
    """One worker's place: a process at a time, restarted in the same slot."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    state: str = "starting"
    started_at: float = 0.0
    restarts: int = 0
    last_pong: float = 0.0
    generation: int = 0
    # Its calls in flight per client, as its last ping said.
    per_client: Counter[str] = field(default_factory=Counter)
    serving: asyncio.Event = field(default_factory=asyncio.Event)
    # The highest usage record of its process journalled here, and acknowledged to it
    # (so it can delete its usage files: journal_files.py); the token naming them.
    journalled: int = 0
    acknowledged: int = 0
    token: str | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class WorkersInFlight(InFlight):
    """The main process runs no calls: its calls in flight are the workers' (as their
    pings said), and what a revocation cancelled is what the workers acknowledged."""

    def __init__(self, workers: Callable[[], Counter[str]]) -> None:
        super().__init__()
        self._workers = workers
        self.cancelled_in_workers: Counter[str] = Counter()

    def cancel_client(self, client_id: str) -> int:
        return super().cancel_client(client_id) + self.cancelled_in_workers.pop(client_id, 0)

    def total(self) -> int:
        return self._workers().total()

    def per_client(self) -> Counter[str]:
        return self._workers()
