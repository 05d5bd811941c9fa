"""Per-client request-rate and concurrency limits.

Every check runs on the event loop thread with no await between checking and
reserving, so limits are exact however many connections a client opens.
A refused call reserves nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from vibectld.service.refusals import LimitExceeded

WINDOW_SECONDS = 60.0
# Concurrency frees up when any call ends; there is no window to compute from.
CONCURRENCY_RETRY_MS = 250


def check_token_budget(used: int, budget: int | None, now: float) -> None:
    """Refuse a call that would start with the day's token budget already spent.

    A call admitted under budget may finish over it (its size is unknown until
    the model reports usage); the overrun is counted and later calls that day
    are refused.
    """
    if budget is None or used < budget:
        return
    midnight = (int(now) // 86400 + 1) * 86400
    retry_ms = max(1, int((midnight - now) * 1000))
    raise LimitExceeded(
        f"this client has used {used} of its {budget} tokens for today (UTC); "
        "the budget renews at midnight UTC",
        "tokens",
        retry_ms,
    )


class Limiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._running: dict[str, int] = {}

    @contextmanager
    def admit(self, client_id: str, rpm: int | None, concurrency: int | None) -> Iterator[None]:
        """Reserve one request slot for the duration of the block, or raise LimitExceeded."""
        now = self._clock()
        recent = self._recent.setdefault(client_id, deque())
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        running = self._running.get(client_id, 0)
        if concurrency is not None and running >= concurrency:
            raise LimitExceeded(
                f"this client already has {running} requests running (limit {concurrency}); "
                "wait for one to finish",
                "concurrency",
                CONCURRENCY_RETRY_MS,
            )
        if rpm is not None and len(recent) >= rpm:
            retry_ms = max(1, int((recent[-rpm] + WINDOW_SECONDS - now) * 1000))
            raise LimitExceeded(
                f"this client may make {rpm} requests per minute; retry in {retry_ms / 1000:.1f} s",
                "rpm",
                retry_ms,
            )
        if rpm is not None:
            recent.append(now)
        self._running[client_id] = running + 1
        try:
            yield
        finally:
            left = self._running[client_id] - 1
            if left:
                self._running[client_id] = left
            else:
                del self._running[client_id]
