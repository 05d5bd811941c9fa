"""The mirror's per-call copy of a client record is what dataclasses.replace would give.

mirror._counted builds the copy through the instance __dict__ (it is on every served
call's path); this holds it to replace's result, and fails if ClientRecord changes in a
way that makes the shortcut wrong (slots, a __post_init__).
"""

from __future__ import annotations

import dataclasses

from vibectld.store.mirror import _counted
from vibectld.store.records import ClientRecord


def _full() -> ClientRecord:
    # Every field set to something other than its default.
    return ClientRecord(
        id="jti-1",
        name="ci",
        created_at=100,
        expires_at=10_000,
        issued_by="admin",
        note="n",
        models=("a", "b"),
        rpm=5,
        concurrency=2,
        tokens_per_day=1000,
        revoked_at=None,
        revoked_by=None,
        revoke_reason=None,
        last_seen_at=500,
        requests=7,
        kid="k1",
        usd_per_month=3.5,
    )


def test_counted_is_replace_with_one_more_request() -> None:
    record = _full()
    for now in (400, 500, 600):
        expected = dataclasses.replace(
            record, requests=record.requests + 1, last_seen_at=max(now, 500)
        )
        got = _counted(record, now)
        assert got == expected
        assert type(got) is ClientRecord
        assert dataclasses.asdict(got) == dataclasses.asdict(expected)
    assert record.requests == 7  # the original is untouched


def test_counted_from_never_seen() -> None:
    record = dataclasses.replace(_full(), last_seen_at=None, requests=0)
    got = _counted(record, 42)
    assert (got.requests, got.last_seen_at) == (1, 42)
    assert hash(got) == hash(dataclasses.replace(record, requests=1, last_seen_at=42))


def test_client_record_still_allows_the_shortcut() -> None:
    assert not hasattr(ClientRecord, "__post_init__")
    assert not hasattr(ClientRecord, "__slots__")
