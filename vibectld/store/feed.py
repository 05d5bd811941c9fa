"""The change feed: how a node learns what other nodes changed (PostgreSQL only).

Every write that other nodes must act on (a client issued, revoked or updated; a
signing key made or retired) adds a row to `changes` in its own transaction and a
NOTIFY on `vibectld_changes`, which PostgreSQL delivers only once that transaction
commits. The row ids are taken under one advisory lock held until commit, so their
order is commit order: a reader that has seen every id up to N has seen every change
committed before N's.
"""

from __future__ import annotations

from vibectld.store.base import Transaction

CHANNEL = "vibectld_changes"
# Held from the change row's id to the commit: ids are handed out in commit order.
LOCK = "vibectld changes"

CLIENT = "client"
SIGNING_KEY = "signing_key"
KINDS = (CLIENT, SIGNING_KEY)


def record_change(tx: Transaction, kind: str, key: str, now: int) -> int:
    """Add a change of `kind` to `key` (a client id, a kid) to the feed; its id.

    Only for a shared (PostgreSQL) database, inside the transaction that makes the change.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown change kind {kind!r}")
    tx.lock(LOCK)
    rows = tx.select(
        "INSERT INTO changes (at, kind, key) VALUES (?, ?, ?) RETURNING id", (now, kind, key)
    )
    change_id = int(rows[0][0])
    # The payload is only a wake-up: a listener reads the rows after the id it last saw.
    tx.select("SELECT pg_notify(?, ?)", (CHANNEL, str(change_id)))
    return change_id
