"""Per-client request-rate and concurrency limits.

Every check runs on the event loop thread with no await between checking and
reserving, so limits are exact however many connections a client opens.
A call refused by a check takes nothing from it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from vibectld.config import LimitsConfig
from vibectld.service.refusals import LimitExceeded
from vibectld.store import spend
from vibectld.store.registry import ClientRecord

WINDOW_SECONDS = 60.0
# Concurrency frees up when any call ends; there is no window to compute from.
CONCURRENCY_RETRY_MS = 250


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """The limits that apply to one client: its own overrides, else the server's defaults."""

    rpm: int | None
    concurrency: int | None
    tokens_per_day: int | None
    max_input_chars: int | None
    request_timeout_seconds: int
    usd_per_month: float | None = None

    @classmethod
    def of(cls, client: ClientRecord, defaults: LimitsConfig) -> EffectiveLimits:
        return cls(
            rpm=client.rpm if client.rpm is not None else defaults.requests_per_minute,
            concurrency=(
                client.concurrency
                if client.concurrency is not None
                else defaults.concurrent_requests
            ),
            tokens_per_day=(
                client.tokens_per_day
                if client.tokens_per_day is not None
                else defaults.tokens_per_day
            ),
            max_input_chars=defaults.max_input_chars,
            request_timeout_seconds=defaults.request_timeout_seconds,
            usd_per_month=(
                client.usd_per_month if client.usd_per_month is not None else defaults.usd_per_month
            ),
        )


def check_token_budget(used: int, budget: int | None, now: float) -> None:
    """Refuse a call that would start with the day's token budget already spent.

    A call admitted under budget may finish over it (its size is unknown until
    the model reports usage); the overrun is counted and later calls that day
    are refused.
    """
    if budget is None or used < budget:
        return
    raise LimitExceeded(
        f"this client has used {used} of its {budget} tokens for today (UTC); "
        "the budget renews at midnight UTC",
        "tokens",
        retry_after_ms(spend.next_day_start(now), now),
    )


def retry_after_ms(at: float, now: float) -> int:
    """Milliseconds from `now` until a budget period ends at `at` (at least 1)."""
    return max(1, int((at - now) * 1000))


class Limiter:
    """The rpm window and the concurrency reservation, as two separate steps.

    The rpm step comes right after authentication, so every authenticated call
    counts against the client's rate, whatever happens to it later (bad input,
    an unknown model, a budget). The concurrency reservation comes last, just
    before the call runs.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._recent: dict[str, deque[float]] = {}
        self._running: dict[str, int] = {}

    def count_request(self, client_id: str, rpm: int | None) -> None:
        """Count this call in the client's 60 s window, or raise LimitExceeded.

        A call refused here is not counted, so a client that keeps retrying
        gets through as soon as its window has room, when retry-after-ms says.
        """
        if rpm is None:
            return
        now = self._clock()
        # The window's upkeep inline (as in _window): this is every limited call's path.
        recent = self._recent.get(client_id)
        if recent is None:
            recent = self._recent[client_id] = deque()
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= rpm:
            raise rpm_refusal(rpm, max(1, int((recent[-rpm] + WINDOW_SECONDS - now) * 1000)))
        recent.append(now)

    def note_request(self, client_id: str) -> None:
        """Count a call that another judge (the cluster's database) admitted, unchecked,
        so that a fallback to this node's share starts from what this node served."""
        now = self._clock()
        self._window(client_id, now).append(now)

    def _window(self, client_id: str, now: float) -> deque[float]:
        recent = self._recent.get(client_id)
        if recent is None:
            recent = self._recent[client_id] = deque()
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        return recent

    @contextmanager
    def reserve(self, client_id: str, concurrency: int | None) -> Iterator[None]:
        """Hold one of the client's concurrent slots for the block, or raise LimitExceeded."""
        # take() and give_back() inline: this is every call's path on one node.
        running = self._running.get(client_id, 0)
        if concurrency is not None and running >= concurrency:
            raise concurrency_refusal(running, concurrency)
        self._running[client_id] = running + 1
        try:
            yield
        finally:
            left = self._running[client_id] - 1
            if left:
                self._running[client_id] = left
            else:
                del self._running[client_id]

    def take(self, client_id: str, concurrency: int | None) -> None:
        """Take one of the client's concurrent slots (unchecked when `concurrency` is
        None), or raise LimitExceeded. Each take is matched by one give_back."""
        running = self._running.get(client_id, 0)
        if concurrency is not None and running >= concurrency:
            raise concurrency_refusal(running, concurrency)
        self._running[client_id] = running + 1

    def give_back(self, client_id: str) -> None:
        left = self._running[client_id] - 1
        if left:
            self._running[client_id] = left
        else:
            del self._running[client_id]


def rpm_refusal(rpm: int, retry_ms: int) -> LimitExceeded:
    return LimitExceeded(
        f"this client may make {rpm} requests per minute; retry in {retry_ms / 1000:.1f} s",
        "rpm",
        retry_ms,
    )


def concurrency_refusal(running: int, concurrency: int) -> LimitExceeded:
    return LimitExceeded(
        f"this client already has {running} requests running (limit {concurrency}); "
        "wait for one to finish",
        "concurrency",
        CONCURRENCY_RETRY_MS,
    )
