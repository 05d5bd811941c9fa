"""PostgreSQL for the integration tests that run vibectld on `storage.backend: postgresql`
(tests/postgres.py: one server per session, started only when a test asks for it, one
fresh database per test). Imported here so that pytest registers the fixtures."""

from tests.postgres import postgres, postgres_server

__all__ = ["postgres", "postgres_server"]
