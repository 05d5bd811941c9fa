"""The store suites' fixtures: a real PostgreSQL (tests/postgres.py) and HAProxy
(tests/haproxy.py). Imported here so that pytest registers them for tests/store."""

from tests.haproxy import haproxy
from tests.postgres import postgres, postgres_server

__all__ = ["haproxy", "postgres", "postgres_server"]
