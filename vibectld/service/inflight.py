"""Calls in progress, per client, so a revocation can cancel them at once."""

from __future__ import annotations

import asyncio
from collections import Counter


class InFlight:
    def __init__(self) -> None:
        self._tasks: dict[str, set[asyncio.Task[object]]] = {}
        self._revoked: set[asyncio.Task[object]] = set()

    def enter(self, client_id: str) -> asyncio.Task[object]:
        """Track the running task as one of the client's calls; `leave` ends it."""
        task = asyncio.current_task()
        assert task is not None
        tasks = self._tasks.get(client_id)
        if tasks is None:
            tasks = self._tasks[client_id] = set()
        tasks.add(task)
        return task

    def leave(self, client_id: str, task: asyncio.Task[object]) -> None:
        tasks = self._tasks[client_id]
        tasks.discard(task)
        if not tasks:
            del self._tasks[client_id]
        self._revoked.discard(task)

    def cancel_client(self, client_id: str) -> int:
        """Cancel every call of the client; return how many there were."""
        tasks = self._tasks.get(client_id, set())
        for task in tasks:
            self._revoked.add(task)
            task.cancel("client revoked")
        return len(tasks)

    def was_revoked(self, task: asyncio.Task[object] | None) -> bool:
        return task in self._revoked

    def total(self) -> int:
        return sum(len(t) for t in self._tasks.values())

    def per_client(self) -> Counter[str]:
        return Counter({cid: len(t) for cid, t in self._tasks.items()})
