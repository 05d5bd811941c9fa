"""The in-memory Limiter: one node's rpm window and concurrency slots, and the fallback
the cluster limiter uses (note_request, take/give_back unchecked)."""

from __future__ import annotations

import pytest

from vibectld.service.limits import CONCURRENCY_RETRY_MS, Limiter
from vibectld.service.refusals import LimitExceeded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rpm_window_is_exact_and_a_refused_call_is_not_counted() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    for _ in range(3):
        limiter.count_request("c", 3)
        clock.now += 1
    with pytest.raises(LimitExceeded) as refused:
        limiter.count_request("c", 3)
    assert refused.value.limit_type == "rpm"
    # The first of the three leaves the window 60 s after it was counted, 57 s from now.
    assert refused.value.retry_after_ms == 57_000
    clock.now += 57
    limiter.count_request("c", 3)  # room again: the refused call took nothing
    limiter.count_request("other", 3)  # each client has its own window


def test_calls_admitted_elsewhere_count_in_this_nodes_window() -> None:
    clock = Clock()
    limiter = Limiter(clock)
    limiter.note_request("c")
    limiter.note_request("c")
    with pytest.raises(LimitExceeded):
        limiter.count_request("c", 2)
    clock.now += 60
    limiter.count_request("c", 2)  # noted calls leave the window like counted ones


def test_no_rpm_counts_nothing() -> None:
    limiter = Limiter(Clock())
    for _ in range(100):
        limiter.count_request("c", None)
    limiter.count_request("c", 1)


def test_concurrency_slots_are_taken_and_given_back() -> None:
    limiter = Limiter(Clock())
    with limiter.reserve("c", 2), limiter.reserve("c", 2):
        with pytest.raises(LimitExceeded) as refused:
            limiter.take("c", 2)
        assert refused.value.limit_type == "concurrency"
        assert refused.value.retry_after_ms == CONCURRENCY_RETRY_MS
        assert "2 requests running (limit 2)" in refused.value.message
    limiter.take("c", 1)
    # Unchecked takes (a slot the cluster's database granted) still count here.
    limiter.take("c", None)
    with pytest.raises(LimitExceeded):
        limiter.take("c", 2)
    limiter.give_back("c")
    limiter.give_back("c")
    with limiter.reserve("c", 1):
        pass


def test_a_failing_block_gives_its_slot_back() -> None:
    limiter = Limiter(Clock())
    with pytest.raises(RuntimeError), limiter.reserve("c", 1):
        raise RuntimeError("the call failed")
    with limiter.reserve("c", 1):
        pass
