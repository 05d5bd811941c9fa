"""The store contract, part two: usage, spend and redaction counts, and their flush.

Every test runs on both backends (tests/store/backends.py). Counts go to memory at once
and to the database in batches, as increments; a failed batch loses nothing.
"""

from __future__ import annotations

import math
import threading

import pytest

from tests.store.backends import Backend
from vibectld.store.registry import (
    ClientNotFound,
    ClientRecord,
    Registry,
    RegistryError,
    UsageRow,
)
from vibectld.store.usage import day_of

NOW = 1_800_000_000  # 2027-01-15 08:00:00 UTC
DAY = 86400
MIDNIGHT = (NOW // DAY + 1) * DAY  # 2027-01-16 00:00:00 UTC
ADMIN = "root(0)"
TODAY = "2027-01-15"
TOMORROW = "2027-01-16"


@pytest.fixture
def registry(backend: Backend) -> Registry:
    return backend.open(now=NOW)


def issue(reg: Registry, name: str = "alice", now: int = NOW) -> ClientRecord:
    return reg.issue(name=name, expires_at=now + 90 * DAY, issued_by=ADMIN, now=now)


def call(
    reg: Registry,
    client: ClientRecord,
    now: int = NOW,
    *,
    error: bool = False,
    tokens: tuple[int | None, int | None] = (10, 20),
    cost: float | None = None,
) -> None:
    reg.record_call(
        client.id,
        now=now,
        error=error,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cost_usd=cost,
    )


def rows(backend: Backend) -> list[tuple[str, str, int, int, int, int, float]]:
    return backend.sql(
        "SELECT client_id, day, requests, errors, input_tokens, output_tokens, cost_usd "
        "FROM usage ORDER BY client_id, day"
    )


def counters(backend: Backend, client_id: str) -> tuple[int, int | None]:
    [(requests, last_seen)] = backend.sql(
        "SELECT requests, last_seen_at FROM clients WHERE id = ?", (client_id,)
    )
    return requests, last_seen


def test_day_of() -> None:
    assert day_of(NOW) == TODAY
    assert day_of(MIDNIGHT - 1) == TODAY and day_of(MIDNIGHT) == TOMORROW
    assert day_of(0) == "1970-01-01"


def test_calls_count_in_memory_then_persist_on_flush(backend: Backend, registry: Registry) -> None:
    alice = issue(registry)
    call(registry, alice, NOW + 1, cost=0.25)
    call(registry, alice, NOW + 2, error=True, tokens=(None, None))
    call(registry, alice, NOW + 3, tokens=(5, None), cost=0.5)
    # Memory at once: the client's counters and the day's tokens.
    record = registry.get(alice.id)
    assert record is not None and record.requests == 3 and record.last_seen_at == NOW + 3
    assert registry.tokens_used(alice.id, NOW + 4) == 10 + 20 + 5
    assert registry.tokens_used("unknown", NOW) == 0
    # Nothing on disk before the flush.
    assert rows(backend) == []
    assert counters(backend, alice.id) == (0, None)

    registry.flush()
    assert rows(backend) == [(alice.id, TODAY, 3, 1, 15, 20, 0.75)]
    assert counters(backend, alice.id) == (3, NOW + 3)
    # Repeated flushes add nothing; a new call is added exactly once.
    registry.flush()
    registry.flush()
    assert rows(backend) == [(alice.id, TODAY, 3, 1, 15, 20, 0.75)]
    call(registry, alice, NOW + 10)
    registry.flush()
    registry.flush()
    assert rows(backend) == [(alice.id, TODAY, 4, 1, 25, 40, 0.75)]
    assert counters(backend, alice.id) == (4, NOW + 10)


def test_a_call_without_usage_counts_no_tokens(backend: Backend, registry: Registry) -> None:
    alice = issue(registry)
    call(registry, alice, NOW + 1, tokens=(None, None))
    registry.flush()
    assert rows(backend) == [(alice.id, TODAY, 1, 0, 0, 0, 0.0)]


def test_unknown_client_and_odd_values(backend: Backend, registry: Registry) -> None:
    alice = issue(registry)
    call(registry, ClientRecord("nope", "nope", NOW, NOW + DAY, ADMIN))  # ignored
    call(registry, alice, tokens=(-5, -1), cost=-1.0)
    call(registry, alice, tokens=(3, 4), cost=math.nan)
    call(registry, alice, cost=math.inf)
    registry.flush()
    assert rows(backend) == [(alice.id, TODAY, 3, 0, 13, 24, 0.0)]


def test_close_flushes_and_reopen_restores_todays_tokens(backend: Backend) -> None:
    reg = backend.open(now=NOW)
    alice = issue(reg)
    bob = issue(reg, "bob")
    call(reg, alice, NOW + 1, tokens=(100, 50))
    call(reg, bob, NOW + 2, tokens=(1, 1))
    reg.close()
    assert rows(backend) == sorted(
        [(alice.id, TODAY, 1, 0, 100, 50, 0.0), (bob.id, TODAY, 1, 0, 1, 1, 0.0)]
    )

    again = backend.open(now=NOW + 3600)
    try:
        assert again.tokens_used(alice.id, NOW + 3600) == 150
        assert again.tokens_used(bob.id, NOW + 3600) == 2
        call(again, alice, NOW + 3601, tokens=(1, 2))
        assert again.tokens_used(alice.id, NOW + 3601) == 153
        assert [r.name for r in again.top_today(NOW + 3601)] == ["alice", "bob"]
        # Tomorrow starts from zero.
        assert again.tokens_used(alice.id, MIDNIGHT) == 0
        again.flush()
        assert (alice.id, TODAY, 2, 0, 101, 52, 0.0) in rows(backend)
    finally:
        again.close()

    # Opened on a later day, the old day's totals are not today's.
    later = backend.open(now=MIDNIGHT + 60)
    try:
        assert later.tokens_used(alice.id, MIDNIGHT + 60) == 0
    finally:
        later.close()


def test_day_boundary_gives_two_rows(backend: Backend, registry: Registry) -> None:
    alice = issue(registry)
    call(registry, alice, MIDNIGHT - 1, tokens=(1, 1))
    call(registry, alice, MIDNIGHT, tokens=(2, 2))
    assert registry.tokens_used(alice.id, MIDNIGHT - 1) == 2
    assert registry.tokens_used(alice.id, MIDNIGHT) == 4
    registry.flush()
    assert rows(backend) == [
        (alice.id, TODAY, 1, 0, 1, 1, 0.0),
        (alice.id, TOMORROW, 1, 0, 2, 2, 0.0),
    ]


def test_old_days_leave_memory_but_not_the_database(registry: Registry) -> None:
    alice = issue(registry)
    call(registry, alice, NOW, tokens=(1, 1))
    call(registry, alice, NOW + 3 * DAY, tokens=(5, 5))
    registry.flush()
    # Memory keeps only today and yesterday; the old day stays on disk.
    assert registry.tokens_used(alice.id, NOW) == 0
    assert registry.tokens_used(alice.id, NOW + 3 * DAY) == 10
    (row,) = registry.usage(since_day=TODAY)
    assert (row.requests, row.input_tokens, row.output_tokens) == (2, 6, 6)


def test_usage_filters_aggregates_and_orders(registry: Registry) -> None:
    alice = issue(registry)
    bob = issue(registry, "bob")
    carol = issue(registry, "carol")
    issue(registry, "dave")  # no calls: not listed without a name
    for day in range(3):
        call(registry, alice, NOW + day * DAY, cost=1.0)
        call(registry, bob, NOW + day * DAY, error=True, cost=2.0)
        call(registry, bob, NOW + day * DAY, cost=None)
    call(registry, carol, NOW + 2 * DAY)
    call(registry, carol, NOW + 2 * DAY)
    call(registry, carol, NOW + 2 * DAY)
    # Not flushed: usage() includes what only memory holds.
    since = day_of(NOW + DAY)
    got = registry.usage(since_day=since, now=NOW + 2 * DAY)
    assert got == [
        UsageRow(bob.id, "bob", 4, 2, 40, 80, 4.0),
        UsageRow(alice.id, "alice", 2, 0, 20, 40, 2.0),
        UsageRow(carol.id, "carol", 3, 0, 30, 60, 0.0),
    ]
    assert registry.usage(since_day=TODAY)[0] == UsageRow(bob.id, "bob", 6, 3, 60, 120, 6.0)
    assert registry.usage(since_day=day_of(NOW + 3 * DAY)) == []
    # By name and by id.
    assert registry.usage(since_day=since, name_or_id="alice") == [
        UsageRow(alice.id, "alice", 2, 0, 20, 40, 2.0)
    ]
    assert registry.usage(since_day=since, name_or_id=bob.id)[0].requests == 4
    # A named client without usage is shown with zeros.
    assert registry.usage(since_day=since, name_or_id="dave")[0].requests == 0
    # Ties on cost go to the busier client.
    assert [r.name for r in registry.usage(since_day=day_of(NOW + 2 * DAY))] == [
        "bob",
        "alice",
        "carol",
    ]
    assert registry.usage(since_day=day_of(NOW + 2 * DAY))[0].to_dict()["cost_usd"] == 2.0


def test_usage_of_a_reissued_name_has_a_row_per_client(registry: Registry) -> None:
    old = issue(registry)
    call(registry, old, NOW + 1)
    call(registry, old, NOW + 2)
    registry.revoke("alice", by=ADMIN, now=NOW + 3)
    new = issue(registry, now=NOW + 4)
    got = registry.usage(since_day=TODAY, name_or_id="alice", now=NOW + 5)
    assert [(r.client_id, r.requests) for r in got] == [(old.id, 2), (new.id, 0)]
    call(registry, new, NOW + 6, cost=0.01)
    got = registry.usage(since_day=TODAY, name_or_id="alice", now=NOW + 7)
    assert [(r.client_id, r.requests) for r in got] == [(new.id, 1), (old.id, 2)]


def test_usage_bad_arguments(registry: Registry) -> None:
    issue(registry)
    with pytest.raises(ClientNotFound):
        registry.usage(since_day=TODAY, name_or_id="bob")
    for bad in ("2027-1-5", "yesterday", "2027-02-30", "2027-W01-1", ""):
        with pytest.raises(RegistryError, match="since_day must be a date"):
            registry.usage(since_day=bad)


def test_top_today(registry: Registry) -> None:
    a, b, c, d = (issue(registry, n) for n in "abcd")
    call(registry, a, NOW, cost=1.0)
    call(registry, b, NOW, cost=3.0)
    call(registry, c, NOW, cost=1.0)
    call(registry, c, NOW, cost=None)
    call(registry, d, NOW - DAY, cost=100.0)  # yesterday: not today's top
    top = registry.top_today(NOW + 60)
    assert [(r.name, r.requests, r.cost_usd) for r in top] == [
        ("b", 1, 3.0),
        ("c", 2, 1.0),
        ("a", 1, 1.0),
    ]
    assert [r.name for r in registry.top_today(NOW, limit=1)] == ["b"]
    assert registry.top_today(NOW, limit=0) == []
    assert registry.top_today(MIDNIGHT) == []


def test_failed_flush_keeps_counts_for_the_next(backend: Backend, registry: Registry) -> None:
    alice = issue(registry)
    call(registry, alice, NOW + 1, cost=0.5)
    registry.flush()
    call(registry, alice, NOW + 2, cost=0.5)
    call(registry, alice, NOW + 3, error=True)
    # Make every usage write fail, as a full or broken disk would.
    with backend.failing("usage"):
        with pytest.raises(RegistryError, match="disk on fire"):
            registry.flush()
        # The transaction rolled back as a whole: the client counters did not move either.
        assert rows(backend) == [(alice.id, TODAY, 1, 0, 10, 20, 0.5)]
        assert counters(backend, alice.id) == (1, NOW + 1)
        assert registry.tokens_used(alice.id, NOW + 4) == 90
        with pytest.raises(RegistryError):
            registry.flush()
        call(registry, alice, NOW + 5)  # counted while the disk is failing

    registry.flush()
    registry.flush()
    assert rows(backend) == [(alice.id, TODAY, 4, 1, 40, 80, 1.0)]
    assert counters(backend, alice.id) == (4, NOW + 5)
    assert registry.usage(since_day=TODAY)[0].requests == 4


def test_closed_registry(registry: Registry) -> None:
    alice = issue(registry)
    registry.close()
    with pytest.raises(RegistryError, match="closed"):
        registry.usage(since_day=TODAY)
    call(registry, alice)  # memory still counts
    assert registry.tokens_used(alice.id, NOW) == 30
    with pytest.raises(RegistryError, match="closed"):
        registry.flush()


def test_concurrent_calls_and_flushes_count_exactly(backend: Backend, registry: Registry) -> None:
    clients = [issue(registry, f"c{i}") for i in range(4)]
    per_thread = 300
    stop = threading.Event()

    def caller(client: ClientRecord) -> None:
        for i in range(per_thread):
            call(registry, client, NOW + i, tokens=(1, 2), cost=0.5)

    def flusher() -> None:
        while not stop.is_set():
            registry.flush()

    threads = [threading.Thread(target=caller, args=(c,)) for c in clients for _ in range(2)]
    background = threading.Thread(target=flusher)
    background.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    background.join()
    registry.flush()
    got = rows(backend)
    assert [r[2:] for r in got] == [(2 * per_thread, 0, 600, 1200, 300.0)] * 4
    for c in clients:
        assert counters(backend, c.id) == (2 * per_thread, NOW + per_thread - 1)


# -- secrets the redaction policy found, per client, day and kind ------------------------


def redaction_rows(backend: Backend) -> list[tuple[str, str, str, int]]:
    return backend.sql(
        "SELECT client_id, day, kind, count FROM redactions ORDER BY client_id, day, kind"
    )


def test_redactions_are_counted_per_kind_and_persist_on_flush(
    backend: Backend, registry: Registry
) -> None:
    alice = issue(registry)
    bob = issue(registry, "bob")
    call(registry, alice)
    registry.record_redactions(alice.id, now=NOW, found={"jwt": 1, "k8s_secret": 2})
    registry.record_redactions(alice.id, now=NOW + 1, found={"jwt": 1})
    registry.record_redactions(alice.id, now=MIDNIGHT, found={"password": 1})
    # A client whose only call was refused for its secrets: listed, with no requests.
    registry.record_redactions(bob.id, now=NOW, found={"private_key": 1})
    registry.record_redactions("unknown", now=NOW, found={"jwt": 1})  # ignored
    got = {r.name: r for r in registry.usage(since_day=TODAY)}
    assert got["alice"].redactions == {"jwt": 2, "k8s_secret": 2, "password": 1}
    assert got["alice"].requests == 1
    assert (got["bob"].requests, got["bob"].redactions) == (0, {"private_key": 1})
    assert registry.usage(since_day=TOMORROW, name_or_id="alice")[0].redactions == {"password": 1}
    assert redaction_rows(backend) == sorted(
        [
            (alice.id, TODAY, "jwt", 2),
            (alice.id, TODAY, "k8s_secret", 2),
            (alice.id, TOMORROW, "password", 1),
            (bob.id, TODAY, "private_key", 1),
        ]
    )
    # Increments: a second flush and more counts add, never double.
    registry.record_redactions(alice.id, now=NOW, found={"jwt": 3})
    registry.flush()
    registry.flush()
    assert (alice.id, TODAY, "jwt", 5) in redaction_rows(backend)


def test_a_failed_flush_keeps_the_redaction_counts(backend: Backend, registry: Registry) -> None:
    alice = issue(registry)
    registry.record_redactions(alice.id, now=NOW, found={"jwt": 1})
    with backend.failing("redactions", ["INSERT"]):
        with pytest.raises(RegistryError, match="disk on fire"):
            registry.flush()
        registry.record_redactions(alice.id, now=NOW, found={"jwt": 1, "token": 1})
    registry.flush()
    assert redaction_rows(backend) == sorted(
        [(alice.id, TODAY, "jwt", 2), (alice.id, TODAY, "token", 1)]
    )


def test_spend_counts_in_memory_and_a_restart_restores_it(backend: Backend) -> None:
    registry = backend.open(now=NOW)
    alice = issue(registry)
    bob = issue(registry, "bob")
    call(registry, alice, NOW, cost=1.25)
    call(registry, bob, NOW, cost=0.5)
    call(registry, alice, NOW - 10 * DAY, cost=2.0)  # earlier this month
    call(registry, alice, NOW - 20 * DAY, cost=4.0)  # last month
    assert registry.usd_spent_month(alice.id, NOW) == 3.25
    assert registry.usd_spent_day(NOW) == 1.75
    registry.close()
    again = backend.open(now=NOW)
    assert again.usd_spent_month(alice.id, NOW) == 3.25
    assert again.usd_spent_month(bob.id, NOW) == 0.5
    assert again.usd_spent_month("unknown", NOW) == 0.0
    assert again.usd_spent_day(NOW) == 1.75
    assert again.usd_spent_day(NOW + DAY) == 0.0
