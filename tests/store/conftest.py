"""The store suites' fixtures: a real PostgreSQL (tests/postgres.py), HAProxy
(tests/haproxy.py), and the contract suite's `backend` (tests/store/backends.py), which
runs each test on SQLite and on PostgreSQL. Imported here so that pytest registers them
for tests/store."""

from tests.haproxy import haproxy
from tests.postgres import postgres, postgres_server
from tests.store.backends import backend

__all__ = ["backend", "haproxy", "postgres", "postgres_server"]
