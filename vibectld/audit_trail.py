"""The admin trail's rows on their way to the store: written at once, or held in memory
while a shared database is away and written, oldest first, once it answers.

Waiting on a database that does not answer would hold the admin caller's answer up to a
connection timeout; the journal already has every record, so holding is enough.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any

import structlog

from vibectld.service.staleness import shares_store
from vibectld.store.base import Store
from vibectld.store.registry import RegistryError

log = structlog.get_logger("vibectld")

# Audit rows of admin operations kept while the database is away, written when it
# answers; past this the oldest are dropped (the journal has every one).
MAX_HELD_AUDIT_ROWS = 1000


class AuditTrail:
    def __init__(self) -> None:
        # Rows waiting for the database (appended from the admin server's threads).
        self._held: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=MAX_HELD_AUDIT_ROWS
        )

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def store(self, registry: Store, row: dict[str, Any]) -> None:
        """Commit an audit row; with a shared database that is away, keep it for later."""
        if not shares_store(registry):
            registry.add_audit(**row)  # SQLite: a failure is the caller's to log
            return
        if not registry.health().degraded and not self._held:
            with contextlib.suppress(RegistryError):
                registry.add_audit(**row)
                return
        if len(self._held) == self._held.maxlen:
            log.warning(
                "audit.held_dropped",
                hint=f"more than {MAX_HELD_AUDIT_ROWS} audit rows waited for the database; "
                "the oldest is in the journal only",
            )
        self._held.append(row)

    def write_held(self, registry: Store) -> None:
        """Write the rows kept while the database was away, oldest first; stop at the
        first failure (the rest wait for the next try). From a thread."""
        while self._held:
            row = self._held[0]
            registry.add_audit(**row)
            # A row held while this one was written may have pushed it out of a full
            # queue already: remove it only if it is still first, never the next one.
            if self._held and self._held[0] is row:
                self._held.popleft()
