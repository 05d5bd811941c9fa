"""The store contract, part one: clients, persistence, audit, failures and several nodes.

Every test runs on both backends (tests/store/backends.py): what one engine does, the
other must do too. SQLite's own behaviour (file modes, WAL, user_version upgrades) is in
test_sqlite.py, PostgreSQL's (its schema lock, its connection string) in
test_postgresql.py; usage, spend and redaction counts are part two (test_contract_usage.py).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from tests.store.backends import Backend
from vibectld.store.base import NodeInfo, Store, StoreHealth
from vibectld.store.registry import (
    MAX_LIMIT,
    UNSET,
    AlreadyRevoked,
    AuditEntry,
    ClientNotFound,
    ClientRecord,
    DuplicateClient,
    Registry,
    RegistryError,
    StorageFailure,
)

NOW = 1_800_000_000
DAY = 86400
ADMIN = "root(0)"


@pytest.fixture
def registry(backend: Backend) -> Registry:
    return backend.open()


def test_the_registry_is_a_store(registry: Registry) -> None:
    store: Store = registry  # mypy checks the Protocol; this runs it on each backend
    assert store.backend in ("sqlite", "postgresql")


def issue(reg: Registry, name: str = "alice", now: int = NOW, days: int = 90) -> ClientRecord:
    return reg.issue(name=name, expires_at=now + days * DAY, issued_by=ADMIN, now=now)


def test_issue_get_find(registry: Registry) -> None:
    rec = registry.issue(
        name="alice",
        expires_at=NOW + 90 * DAY,
        issued_by=ADMIN,
        note="on-call laptop",
        models=["gpt-4o-mini", "claude"],
        rpm=10,
        concurrency=2,
        tokens_per_day=50_000,
        now=NOW,
    )
    assert len(rec.id) == 32 and int(rec.id, 16) >= 0
    assert rec.name == "alice" and rec.created_at == NOW and rec.expires_at == NOW + 90 * DAY
    assert rec.models == ("gpt-4o-mini", "claude")
    assert (rec.rpm, rec.concurrency, rec.tokens_per_day) == (10, 2, 50_000)
    assert rec.requests == 0 and rec.last_seen_at is None and rec.revoked_at is None
    assert registry.get(rec.id) == rec
    assert registry.get("nope") is None
    assert registry.find(rec.id) == rec
    assert registry.find("alice", NOW) == rec
    assert rec.status(NOW) == "active"

    d = rec.to_dict(NOW)
    assert d["status"] == "active" and d["models"] == ["gpt-4o-mini", "claude"]
    assert d["id"] == rec.id and d["note"] == "on-call laptop"


def test_ids_are_unique(registry: Registry) -> None:
    ids = {issue(registry, f"c{i}").id for i in range(50)}
    assert len(ids) == 50


def test_find_unknown(registry: Registry) -> None:
    with pytest.raises(ClientNotFound) as err:
        registry.find("bob", NOW)
    assert str(err.value) == (
        "no client named or with id 'bob'; list them with: vibectl-admin list-clients --all"
    )
    # Something that might be a pasted secret is not repeated back.
    with pytest.raises(ClientNotFound) as err:
        registry.find("eyJ" + "x" * 200, NOW)
    assert "eyJ" not in str(err.value)


def test_duplicate_active_name_refused(registry: Registry) -> None:
    first = issue(registry)
    with pytest.raises(DuplicateClient) as err:
        issue(registry, now=NOW + 10)
    assert str(err.value) == (
        f"an active client named 'alice' exists (id {first.id}); revoke it first or choose "
        "another name"
    )
    assert registry.counts(NOW) == {"active": 1, "expired": 0, "revoked": 0}


def test_name_reusable_after_revoke(registry: Registry) -> None:
    first = issue(registry)
    registry.revoke("alice", by=ADMIN, now=NOW + 5)
    second = issue(registry, now=NOW + 10)
    assert second.id != first.id
    # The active one wins a lookup by name.
    assert registry.find("alice", NOW + 20).id == second.id


def test_name_reusable_after_expiry(registry: Registry) -> None:
    first = issue(registry, days=1)
    second = issue(registry, now=NOW + 2 * DAY)
    assert registry.find("alice", NOW + 2 * DAY).id == second.id
    assert registry.get(first.id) is not None
    assert registry.get(first.id).status(NOW + 2 * DAY) == "expired"  # type: ignore[union-attr]


def test_find_by_name_without_active_prefers_newest(registry: Registry) -> None:
    issue(registry, days=1)
    second = issue(registry, now=NOW + 2 * DAY, days=1)
    assert registry.find("alice", NOW + 10 * DAY).id == second.id


@pytest.mark.parametrize(
    "name", ["", "-alice", ".alice", "al ice", "alice/bob", "a" * 65, "ålice", "alice\n"]
)
def test_bad_names(registry: Registry, name: str) -> None:
    with pytest.raises(RegistryError, match="1 to 64 characters"):
        issue(registry, name)


@pytest.mark.parametrize("name", ["a", "alice", "alice@example.com", "ci-bot_2.x", "A" * 64])
def test_good_names(registry: Registry, name: str) -> None:
    assert issue(registry, name).name == name


def test_bad_issue_arguments(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="future"):
        registry.issue(name="a", expires_at=NOW, issued_by=ADMIN, now=NOW)
    with pytest.raises(RegistryError, match="rpm"):
        registry.issue(name="a", expires_at=NOW + 1, issued_by=ADMIN, rpm=0, now=NOW)
    with pytest.raises(RegistryError, match="models"):
        registry.issue(name="a", expires_at=NOW + 1, issued_by=ADMIN, models=[""], now=NOW)
    assert registry.clients(include_inactive=True) == []


def test_revoke(registry: Registry) -> None:
    rec = issue(registry)
    revoked = registry.revoke(rec.id, by="alice-admin(1000)", reason="laptop lost", now=NOW + 60)
    assert revoked.revoked_at == NOW + 60
    assert revoked.revoked_by == "alice-admin(1000)"
    assert revoked.revoke_reason == "laptop lost"
    assert revoked.status(NOW + 61) == "revoked"
    # The hot path sees it at once.
    assert registry.get(rec.id) == revoked
    with pytest.raises(AlreadyRevoked, match="already revoked"):
        registry.revoke("alice", by=ADMIN, now=NOW + 70)
    with pytest.raises(ClientNotFound):
        registry.revoke("bob", by=ADMIN, now=NOW)


def test_expired_client_can_be_revoked(registry: Registry) -> None:
    rec = issue(registry, days=1)
    assert registry.revoke("alice", by=ADMIN, now=NOW + 2 * DAY).id == rec.id


def test_counts_stay_right_across_expiry_and_every_kind_of_write(registry: Registry) -> None:
    # counts() is cached between writes until the next active client expires.
    issue(registry, "short", now=NOW, days=1)
    issue(registry, "long", now=NOW)
    assert registry.counts(NOW + 10) == {"active": 2, "expired": 0, "revoked": 0}
    assert registry.counts(NOW + DAY - 1) == {"active": 2, "expired": 0, "revoked": 0}
    assert registry.counts(NOW + DAY) == {"active": 1, "expired": 1, "revoked": 0}
    assert registry.counts(NOW + 5) == {"active": 2, "expired": 0, "revoked": 0}  # earlier again
    issue(registry, "third", now=NOW + 20)
    assert registry.counts(NOW + 30) == {"active": 3, "expired": 0, "revoked": 0}
    registry.revoke("third", by=ADMIN, now=NOW + 40)
    assert registry.counts(NOW + 50) == {"active": 2, "expired": 0, "revoked": 1}
    registry.update("long", rpm=5, by=ADMIN, now=NOW + 55)
    assert registry.counts(NOW + 56) == {"active": 2, "expired": 0, "revoked": 1}
    assert registry.counts(NOW + DAY) == {"active": 1, "expired": 1, "revoked": 1}


def test_list_and_counts(registry: Registry) -> None:
    a = issue(registry, "a", now=NOW)
    b = issue(registry, "b", now=NOW + 1, days=1)
    c = issue(registry, "c", now=NOW + 2)
    d = issue(registry, "d", now=NOW + 3)
    registry.revoke("c", by=ADMIN, now=NOW + 4)
    later = NOW + 2 * DAY
    assert registry.clients(now=later) == [a, d]
    assert [r.name for r in registry.clients(include_inactive=True, now=later)] == list("abcd")
    assert registry.counts(later) == {"active": 2, "expired": 1, "revoked": 1}
    assert [r.to_dict(later)["status"] for r in registry.clients(include_inactive=True)] == [
        "active",
        "expired",
        "revoked",
        "active",
    ]
    assert b.status(later) == "expired" and c.status(later) == "active"  # c's old snapshot


def test_reopen_sees_everything(backend: Backend) -> None:
    reg = backend.open()
    alice = reg.issue(
        name="alice",
        expires_at=NOW + DAY,
        issued_by=ADMIN,
        note="n",
        models=["m1"],
        rpm=5,
        now=NOW,
    )
    bob = issue(reg, "bob")
    reg.revoke("bob", by=ADMIN, reason="gone", now=NOW + 9)
    carol = issue(reg, "carol")
    reg.close()

    again = backend.open()
    try:
        assert again.get(alice.id) == alice
        assert again.get(carol.id) == carol
        bob_again = again.get(bob.id)
        assert bob_again is not None
        assert (bob_again.revoked_at, bob_again.revoked_by, bob_again.revoke_reason) == (
            NOW + 9,
            ADMIN,
            "gone",
        )
        assert again.counts(NOW + 10) == {"active": 2, "expired": 0, "revoked": 1}
    finally:
        again.close()


def test_issue_and_revoke_are_durable_without_close(backend: Backend) -> None:
    reg = backend.open()
    rec = issue(reg)
    reg.revoke("alice", by=ADMIN, now=NOW + 1)
    # Another connection (as after a crash) sees the committed rows, before any close.
    other = backend.open()
    try:
        assert other.get(rec.id) is not None
        assert other.get(rec.id).revoked_at == NOW + 1  # type: ignore[union-attr]
    finally:
        other.close()
        reg.close()


def served(reg: Registry, client_id: str, now: int) -> None:
    """A successful call whose model reported no usage, counted as the servicer counts it."""
    reg.record_call(
        client_id, now=now, error=False, input_tokens=None, output_tokens=None, cost_usd=None
    )


def test_record_call_and_flush(backend: Backend) -> None:
    reg = backend.open()
    rec = issue(reg)
    served(reg, rec.id, NOW + 100)
    served(reg, rec.id, NOW + 200)
    served(reg, "unknown-id", NOW + 200)  # ignored: nothing to count
    # Memory first.
    assert reg.get(rec.id).requests == 2  # type: ignore[union-attr]
    assert reg.get(rec.id).last_seen_at == NOW + 200  # type: ignore[union-attr]
    # Not on disk until flushed.
    assert _row(backend, rec.id) == (0, None)
    reg.flush()
    assert _row(backend, rec.id) == (2, NOW + 200)
    served(reg, rec.id, NOW + 300)
    reg.flush()
    reg.flush()  # nothing pending: no change
    assert _row(backend, rec.id) == (3, NOW + 300)
    reg.close()


def test_close_flushes(backend: Backend) -> None:
    reg = backend.open()
    rec = issue(reg)
    served(reg, rec.id, NOW + 5)
    reg.close()
    reg.close()  # idempotent
    assert _row(backend, rec.id) == (1, NOW + 5)
    again = backend.open()
    assert again.get(rec.id).requests == 1  # type: ignore[union-attr]
    again.close()


def test_counted_call_then_revoke_keeps_both(backend: Backend) -> None:
    reg = backend.open()
    rec = issue(reg)
    served(reg, rec.id, NOW + 5)
    revoked = reg.revoke(rec.id, by=ADMIN, now=NOW + 6)
    assert revoked.requests == 1 and revoked.revoked_at == NOW + 6
    reg.close()
    again = backend.open()
    got = again.get(rec.id)
    assert got is not None and got.requests == 1 and got.revoked_at == NOW + 6
    again.close()


def test_closed_registry_refuses_writes(backend: Backend) -> None:
    reg = backend.open()
    reg.close()
    with pytest.raises(RegistryError, match="closed"):
        issue(reg)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rpm", 0, "rpm must be a whole number from 1 to 1000000000, not 0"),
        ("rpm", -5, "rpm must be a whole number from 1 to 1000000000, not -5"),
        ("concurrency", MAX_LIMIT + 1, "concurrency must be a whole number from 1 to"),
        ("tokens_per_day", 10**18, "tokens_per_day must be a whole number from 1 to"),
        ("rpm", True, "rpm must be a whole number"),
        ("rpm", 2.5, "rpm must be a whole number"),
        ("rpm", "5", "rpm must be a whole number"),
        ("models", [], "at least one model"),
        ("models", ["ok", ""], "non-empty model names"),
        ("models", "gpt-4o", "non-empty model names"),
        ("models", [3], "non-empty model names"),
        ("note", "x" * 1001, "at most 1000 characters"),
        ("note", 5, "at most 1000 characters"),
    ],
)
def test_absurd_values_refused(registry: Registry, field: str, value: object, message: str) -> None:
    with pytest.raises(RegistryError) as err:
        registry.issue(
            name="alice",
            expires_at=NOW + DAY,
            issued_by=ADMIN,
            now=NOW,
            **{field: value},  # type: ignore[arg-type]
        )
    assert message in str(err.value)
    assert registry.clients(include_inactive=True) == []
    rec = issue(registry)
    with pytest.raises(RegistryError) as err:
        registry.update("alice", by=ADMIN, now=NOW, **{field: value})
    assert message in str(err.value)
    assert registry.get(rec.id) == rec


def test_largest_limits_accepted(registry: Registry) -> None:
    rec = registry.issue(
        name="a",
        expires_at=NOW + DAY,
        issued_by=ADMIN,
        rpm=MAX_LIMIT,
        concurrency=1,
        tokens_per_day=MAX_LIMIT,
        models=("m1", "m2", "m1"),
        now=NOW,
    )
    assert (rec.rpm, rec.concurrency, rec.tokens_per_day) == (MAX_LIMIT, 1, MAX_LIMIT)
    assert rec.models == ("m1", "m2")


def test_update_each_field_and_clear(backend: Backend) -> None:
    reg = backend.open()
    rec = issue(reg)
    reg.record_call(
        rec.id, now=NOW + 1, error=False, input_tokens=1, output_tokens=1, cost_usd=None
    )
    got = reg.update("alice", by=ADMIN, models=("m1", "m2"), now=NOW + 2)
    assert got.models == ("m1", "m2") and got.rpm is None
    got = reg.update("alice", by=ADMIN, rpm=5, now=NOW + 3)
    assert got.models == ("m1", "m2") and got.rpm == 5
    got = reg.update(rec.id, by=ADMIN, concurrency=2, tokens_per_day=1000, note="n", now=NOW + 4)
    assert (got.rpm, got.concurrency, got.tokens_per_day, got.note) == (5, 2, 1000, "n")
    # The counters survive an update; the hot path sees the change at once.
    assert got.requests == 1 and got.last_seen_at == NOW + 1
    assert reg.get(rec.id) == got
    # UNSET (the default) leaves a field; nothing to change writes nothing.
    assert reg.update("alice", by=ADMIN, rpm=UNSET, now=NOW + 5) == got
    assert repr(UNSET) == "UNSET"
    # None clears an override.
    got = reg.update("alice", by=ADMIN, models=None, rpm=None, note=None, now=NOW + 6)
    assert (got.models, got.rpm, got.concurrency, got.tokens_per_day, got.note) == (
        None,
        None,
        2,
        1000,
        None,
    )
    got = reg.update("alice", by=ADMIN, concurrency=None, tokens_per_day=None, now=NOW + 7)
    assert (got.concurrency, got.tokens_per_day) == (None, None)
    got = reg.update("alice", by=ADMIN, models=["m3"], rpm=7, now=NOW + 8)
    reg.close()

    # Written first: another connection sees it (and who changed it).
    again = backend.open()
    try:
        assert again.get(rec.id) == got
    finally:
        again.close()
    assert backend.sql("SELECT updated_at, updated_by FROM clients") == [(NOW + 8, ADMIN)]


def test_update_picks_the_active_client_by_name(registry: Registry) -> None:
    old = issue(registry)
    registry.revoke("alice", by=ADMIN, now=NOW + 1)
    new = issue(registry, now=NOW + 2)
    assert registry.update("alice", by=ADMIN, rpm=3, now=NOW + 3).id == new.id
    assert registry.get(old.id).rpm is None  # type: ignore[union-attr]


def test_update_refuses_revoked_expired_and_unknown(registry: Registry) -> None:
    rec = issue(registry)
    registry.revoke("alice", by=ADMIN, now=NOW + 1)
    with pytest.raises(AlreadyRevoked) as err:
        registry.update("alice", by=ADMIN, rpm=5, now=NOW + 2)
    assert str(err.value) == "client 'alice' is revoked; issue a new one"
    with pytest.raises(AlreadyRevoked, match="is revoked"):
        registry.update(rec.id, by=ADMIN, now=NOW + 2)  # even with nothing to change

    issue(registry, "bob", days=1)
    with pytest.raises(AlreadyRevoked) as err:
        registry.update("bob", by=ADMIN, rpm=5, now=NOW + 2 * DAY)
    assert str(err.value) == ("client 'bob' expired at 2027-01-16 08:00:00 UTC; issue a new one")
    with pytest.raises(ClientNotFound):
        registry.update("carol", by=ADMIN, rpm=5, now=NOW)


def test_audit_add_and_list(backend: Backend) -> None:
    reg = backend.open()
    reg.add_audit(
        at=NOW, caller_uid=0, caller_user="root", op="issue", target="alice", outcome="ok"
    )
    reg.add_audit(
        at=NOW + 10,
        caller_uid=1000,
        caller_user="ops",
        op="revoke",
        target="alice",
        outcome="ok",
        detail="reason: laptop lost",
    )
    reg.add_audit(
        at=NOW + 20, caller_uid=None, caller_user="?", op="reload", target=None, outcome="failed"
    )
    # Durable at once: another connection sees it without a flush or close.
    other = backend.open()
    try:
        entries = other.audit(since=0)
    finally:
        other.close()
    assert entries == [
        AuditEntry(1, NOW, 0, "root", "issue", "alice", "ok", None),
        AuditEntry(2, NOW + 10, 1000, "ops", "revoke", "alice", "ok", "reason: laptop lost"),
        AuditEntry(3, NOW + 20, None, "?", "reload", None, "failed", None),
    ]
    assert entries[0].to_dict()["caller_user"] == "root"
    assert [e.id for e in reg.audit(since=NOW + 10)] == [2, 3]
    assert reg.audit(since=NOW + 21) == []
    # The newest `limit`, still oldest first.
    assert [e.id for e in reg.audit(since=0, limit=2)] == [2, 3]
    with pytest.raises(RegistryError, match="limit"):
        reg.audit(since=0, limit=0)
    reg.close()
    with pytest.raises(RegistryError, match="closed"):
        reg.add_audit(at=NOW, caller_uid=0, caller_user="root", op="x", target=None, outcome="ok")
    with pytest.raises(RegistryError, match="closed"):
        reg.audit(since=0)


def test_audit_never_stores_secrets(registry: Registry) -> None:
    jwt = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    registry.add_audit(
        at=NOW,
        caller_uid=0,
        caller_user="root",
        op="revoke",
        target=jwt,
        outcome="ok",
        detail=f"pasted vibectl-server://{jwt}@host:1 and Bearer {jwt} and {'x' * 5000}",
    )
    (entry,) = registry.audit(since=0)
    assert entry.target == "[redacted]"
    assert entry.detail is not None and "eyJ" not in entry.detail
    assert entry.detail.startswith("pasted vibectl-server://[redacted]@host:1 and Bearer [")
    assert len(entry.detail) <= 1000
    long_target = "a" * 65
    registry.add_audit(
        at=NOW, caller_uid=0, caller_user="root", op="x", target=long_target, outcome="ok"
    )
    assert registry.audit(since=0)[-1].target == "(a value too long to be a name or id)"


def _row(backend: Backend, jti: str) -> tuple[int, int | None]:
    [(requests, last_seen)] = backend.sql(
        "SELECT requests, last_seen_at FROM clients WHERE id = ?", (jti,)
    )
    return (requests, last_seen)


KID_A, KID_B = "20260101T000000Z-aaaaaa", "20260301T000000Z-bbbbbb"


def test_the_signing_kid_is_recorded_and_counted(backend: Backend) -> None:
    reg = backend.open()
    a1 = reg.issue(name="a1", expires_at=NOW + DAY, issued_by=ADMIN, kid=KID_A, now=NOW)
    reg.issue(name="a2", expires_at=NOW + DAY, issued_by=ADMIN, kid=KID_A, now=NOW)
    b1 = reg.issue(name="b1", expires_at=NOW + DAY, issued_by=ADMIN, kid=KID_B, now=NOW)
    reg.issue(name="b2", expires_at=NOW + 10, issued_by=ADMIN, kid=KID_B, now=NOW)  # expires
    reg.revoke("a2", by=ADMIN, now=NOW + 1)
    assert a1.kid == KID_A and a1.to_dict(NOW)["kid"] == KID_A
    # Only active clients count: a2 is revoked and b2 has expired by NOW + 20.
    assert reg.active_by_kid(NOW + 20) == {KID_A: 1, KID_B: 1}
    assert [r.id for r in reg.active_signed_by(KID_B, NOW + 20)] == [b1.id]
    reg.close()
    again = backend.open()
    got = again.get(a1.id)
    assert got is not None and got.kid == KID_A
    again.close()


# -- a fresh database, several openers, and a database that goes away ---------------------


def test_an_empty_database_gets_the_whole_schema(backend: Backend) -> None:
    backend.open().close()
    for table in ("clients", "usage", "redactions", "audit"):
        assert backend.sql(f"SELECT count(*) FROM {table}") == [(0,)]  # noqa: S608


def test_stores_opened_at_once_on_an_empty_database_agree(backend: Backend) -> None:
    opened: list[Registry] = []
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def open_one() -> None:
        start.wait()
        try:
            opened.append(backend.open())
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 4
    rec = issue(opened[0])
    for store in opened[1:]:
        store.close()
    assert backend.open().get(rec.id) == rec


def test_a_database_that_goes_away_fails_writes_clearly_and_comes_back(backend: Backend) -> None:
    registry = backend.open(now=NOW)
    alice = issue(registry)
    assert registry.health() == StoreHealth(degraded=False)
    with backend.gone(registry):
        with pytest.raises(StorageFailure, match="client registry") as failed:
            issue(registry, "bob")
        assert registry.health().degraded
        assert registry.health().reason == str(failed.value)
        with pytest.raises(StorageFailure):
            registry.revoke("alice", by=ADMIN, now=NOW + 1)
        with pytest.raises(StorageFailure):
            registry.add_audit(
                at=NOW, caller_uid=0, caller_user="root", op="x", target=None, outcome="ok"
            )
        # Memory is unchanged and still serves the request path.
        assert registry.get(alice.id) == alice and registry.counts(NOW)["active"] == 1
        with pytest.raises(ClientNotFound):
            registry.find("bob", NOW)
        registry.record_call(
            alice.id, now=NOW + 2, error=False, input_tokens=1, output_tokens=2, cost_usd=None
        )
        with pytest.raises(StorageFailure):
            registry.flush()
        assert registry.tokens_used(alice.id, NOW + 2) == 3
    # Back: the next operation succeeds without a restart, and nothing counted was lost.
    bob = issue(registry, "bob")
    assert registry.health() == StoreHealth(degraded=False)
    registry.flush()
    assert _row(backend, alice.id) == (1, NOW + 2)
    assert registry.revoke("alice", by=ADMIN, now=NOW + 3).revoked_at == NOW + 3
    assert backend.open().get(bob.id) == bob


# -- what several nodes need ------------------------------------------------------------------


def test_heartbeats_list_the_node_and_freshness_says_how_old_the_view_is(
    backend: Backend,
) -> None:
    registry = backend.open()
    assert registry.nodes() == []
    node = NodeInfo("node-a", "127.0.0.1:50051", "1.2.3", 2, NOW, NOW + 5)
    registry.heartbeat(node)
    assert registry.nodes() == [node]
    later = replace(node, in_flight=0, heartbeat_at=NOW + 10)
    registry.heartbeat(later)
    assert registry.nodes() == [later]
    assert later.to_dict()["address"] == "127.0.0.1:50051"
    age = registry.freshness(time.time() + 60)
    if backend.name == "sqlite":
        assert age is None  # only this process writes the file: always fresh
    else:
        assert age is not None and 60 <= age < 120


def test_own_writes_do_not_call_the_change_callbacks(registry: Registry) -> None:
    heard: list[ClientRecord] = []
    registry.on_change(heard.append)
    issue(registry)
    registry.update("alice", by=ADMIN, rpm=3, now=NOW + 1)
    registry.revoke("alice", by=ADMIN, now=NOW + 2)
    with pytest.raises(AlreadyRevoked):
        registry.revoke("alice", by=ADMIN, now=NOW + 3)
    assert heard == []
