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


# -- reading the feed ------------------------------------------------------------------------

# Rows are kept a day: a node that has not caught up for longer reloads every client.
RETENTION_SECONDS = 86400

# The id to follow from. Read before the clients at a load, so that a change committed
# between the two reads is delivered again (harmless) rather than missed.
LAST_ID_SQL = "SELECT COALESCE(MAX(id), 0) FROM changes"
SINCE_SQL = "SELECT id, kind, key FROM changes WHERE id > ? ORDER BY id"
OLDEST_SQL = "SELECT id, at FROM changes ORDER BY id LIMIT 1"
# Every row before the newest one older than the cutoff goes; that one is kept, so that
# the oldest row left marks where the deleted ids end (see `missed`). Ids are deleted by
# id, not by time, so a writer's clock running behind cannot leave a hole in the middle.
PRUNE_SQL = "DELETE FROM changes WHERE id < (SELECT MAX(id) FROM changes WHERE at < ?)"


def prune(tx: Transaction, now: int) -> int:
    """Delete the changes older than RETENTION_SECONDS (but `PRUNE_SQL`'s one); how many."""
    return tx.execute(PRUNE_SQL, (now - RETENTION_SECONDS,))


def missed(last: int, first_new: int, oldest: tuple[int, int] | None, now: float) -> bool:
    """Whether changes after `last` may have been pruned before this node read them.

    `first_new` is the first id after `last` the table holds, `oldest` the (id, at) of its
    first row. Ids have holes (a transaction that took one and rolled back), so a hole
    after `last` alone proves nothing. Pruning deletes only ids below the row it keeps,
    and that row is older than RETENTION_SECONDS: changes were lost only if the hole
    ends at the table's first row and that row is old. Half the retention is the test,
    so that clocks differing by up to half a day between nodes cannot hide a gap; a node
    that had not read a half-day-old row was away that long and reloads anyway.
    """
    if first_new <= last + 1 or oldest is None:
        return False
    oldest_id, oldest_at = oldest
    return oldest_id > last + 1 and oldest_at < now - RETENTION_SECONDS / 2
