"""Fixtures for tests against a real PostgreSQL server (no mocks), and a fresh database per test.

They come from batchloop's own pytest plugin (:mod:`batchloop.testing.plugin`, loaded through
its ``pytest11`` entry point, so the package must be installed: ``pip install -e '.[dev]'``);
this file keeps the names the tests use:

- ``pg_admin_dsn`` (session): a server where the tests may create databases, chosen as
  :mod:`batchloop.testing.databases` says (``DATABASE_URL``, else 127.0.0.1:5432 as the OS user
  or ``postgres``, else an embedded PostgreSQL; ``BATCHLOOP_TEST_EMBEDDED=1`` forces the last).
- ``dsn``: a brand-new, EMPTY database for this test only, dropped (``WITH (FORCE)``) after it.
  Both kinds are made one test ahead and dropped in a helper thread (``databases.Supply``).
- ``migrated_dsn``: a brand-new database with ``batchloop.migrate`` applied (schema
  ``batchloop``): the plugin's ``batchloop_dsn``, a copy of a template migrated once per
  session. A database of its own, not the test's ``dsn``.

DSNs handed out are ``postgresql://`` URLs that asyncpg and psycopg both accept, e.g.
``postgresql://root@127.0.0.1:5432/bltest_123_ab12cd34ef56`` or, embedded,
``postgresql://postgres@/bltest_123_ab12cd34ef56?host=/tmp/batchloop-pg-xxxx/pgdata``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from batchloop.testing import databases

# Re-exported for tests that build DSNs of their own.
with_database = databases.with_database
database_of = databases.database_of


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pg_admin_dsn(batchloop_admin_dsn: str) -> str:
    """DSN of a server where the tests may create databases (see the module docstring)."""
    return batchloop_admin_dsn


@pytest.fixture(scope="session")
def _empty_databases(pg_admin_dsn: str) -> Iterator[databases.Supply]:
    supply = databases.Supply(pg_admin_dsn)
    try:
        yield supply
    finally:
        supply.close()


@pytest.fixture
def dsn(_empty_databases: databases.Supply) -> Iterator[str]:
    """A brand-new, empty database for this test only; dropped afterwards."""
    url = _empty_databases.take()
    try:
        yield url
    finally:
        _empty_databases.give_back(url)


@pytest.fixture
def migrated_dsn(batchloop_dsn: str) -> str:
    """Like ``dsn``, with ``batchloop.migrate`` already applied (default schema ``batchloop``).

    A plain (sync) fixture, so sync tests can use it too.
    """
    return batchloop_dsn
