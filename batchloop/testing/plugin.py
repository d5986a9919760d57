"""The pytest plugin (entry point ``pytest11``, name ``batchloop``): loaded by pytest in every
project that installs batchloop, so it connects to nothing, starts nothing and imports no
optional package (the embedded server's) until a test asks for one of its fixtures.

Fixtures:

- ``batchloop_dsn``: a fresh database with the batchloop schema migrated, for this test only,
  dropped afterwards (``WITH (FORCE)``). A copy of a template migrated once per session. The
  server: ``DATABASE_URL``, else 127.0.0.1:5432, else an embedded PostgreSQL (see
  :mod:`batchloop.testing.databases`).
- ``batchloop_host``: an async fixture (anyio's pytest plugin, ``@pytest.mark.anyio``) yielding
  a running :class:`batchloop.Host` on ``batchloop_dsn`` for the modules named by the test's
  ``@pytest.mark.batchloop_modules("pkg.mod", ...)``; keyword arguments of the marker are
  passed to ``Host`` (e.g. ``driver="psycopg"``).
- ``batchloop_admin_dsn`` (session): the server's admin DSN, where databases may be created.
- ``batchloop_template`` (session): the name of the migrated template database.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

MARKER = "batchloop_modules"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(*modules, **host_kwargs): the modules whose work queries and workers the "
        "batchloop_host fixture's Host registers (keyword arguments go to batchloop.Host)",
    )


@pytest.fixture(scope="session")
def batchloop_admin_dsn() -> Iterator[str]:
    """DSN of a server where the tests may create databases (see batchloop.testing.databases)."""
    from .databases import ServerUnavailable, admin_server

    with contextlib.ExitStack() as stack:
        problem = None
        try:
            dsn = stack.enter_context(admin_server())
        except ServerUnavailable as exc:
            problem = str(exc)
        if problem is not None:
            pytest.fail(problem, pytrace=False)  # one line, outside the except: no chained trace
        yield dsn


@pytest.fixture(scope="session")
def batchloop_template(batchloop_admin_dsn: str) -> Iterator[str]:
    """A database migrated once per session; each ``batchloop_dsn`` is a copy of it."""
    from .databases import migrated_template

    with migrated_template(batchloop_admin_dsn) as name:
        yield name


@pytest.fixture(scope="session")
def batchloop_databases(batchloop_admin_dsn: str, batchloop_template: str) -> Iterator[Any]:
    """Copies of the template, made one ahead (see ``batchloop.testing.databases.Supply``)."""
    from .databases import Supply

    supply = Supply(batchloop_admin_dsn, batchloop_template)
    try:
        yield supply
    finally:
        supply.close()


@pytest.fixture
def batchloop_dsn(batchloop_databases: Any) -> Iterator[str]:
    """A fresh migrated database for this test, as a ``postgresql://`` URL; dropped after it."""
    dsn: str = batchloop_databases.take()
    try:
        yield dsn
    finally:
        batchloop_databases.give_back(dsn)


@pytest.fixture
async def batchloop_host(
    batchloop_dsn: str, request: pytest.FixtureRequest, anyio_backend: Any
) -> AsyncIterator[Any]:
    """A running ``batchloop.Host`` on ``batchloop_dsn`` for the ``batchloop_modules`` marker's
    modules (none: the callables this process registered already)."""
    from .. import Host

    backend = anyio_backend if isinstance(anyio_backend, str) else anyio_backend[0]
    if backend != "asyncio":
        pytest.fail(f"batchloop_host needs anyio's asyncio backend, not {backend!r}")
    modules: list[str] = []
    kwargs: dict[str, Any] = {}
    # Closest first: a test's marker, then its class's, then its module's; the closest wins.
    for marker in reversed(list(request.node.iter_markers(MARKER))):
        bad = [m for m in marker.args if not isinstance(m, str)]
        if bad:
            pytest.fail(
                f"@pytest.mark.{MARKER} takes module names (str), got {bad[0]!r}", pytrace=False
            )
        modules.extend(m for m in marker.args if m not in modules)
        kwargs.update(marker.kwargs)
    async with Host(batchloop_dsn, modules=modules, **kwargs) as host:
        yield host
