"""Thin adapters from database drivers to the small interfaces batchloop needs.

The runtime and the API speak only the interfaces of :mod:`batchloop.drivers.base` (a
``Session`` for named queries, a ``WorkConnection`` for an iteration's transaction, a
``LoopDriver`` for a loop's connections) and classify failures with
:mod:`batchloop.drivers.errors`; each adapter module maps them onto one client library, by
composition (no adapter subclasses runtime code).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .base import Session


@asynccontextmanager
async def session_for(conn: Any, schema: str) -> AsyncIterator[Session]:
    """A Session over an asyncpg Connection or Pool, a psycopg AsyncConnection, or a SQLAlchemy
    AsyncConnection or AsyncSession on one of those (see :mod:`batchloop.drivers.sqlalchemy`)."""
    from .asyncpg import AsyncpgSession, is_connection, is_pool

    if is_pool(conn):
        async with conn.acquire() as c:
            yield AsyncpgSession(c, schema)
        return
    if is_connection(conn):
        yield AsyncpgSession(conn, schema)
        return
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg is a hard dependency
        psycopg = None  # type: ignore[assignment]
    if psycopg is not None and isinstance(conn, psycopg.AsyncConnection):
        from .psycopg import PsycopgSession

        yield PsycopgSession(conn, schema)
        return
    from .sqlalchemy import driver_connection, is_sqlalchemy  # imports no SQLAlchemy itself

    if is_sqlalchemy(conn):
        async with session_for(await driver_connection(conn), schema) as s:
            yield s
        return
    raise TypeError(
        "conn must be an asyncpg Connection or Pool, a psycopg AsyncConnection, or a "
        "SQLAlchemy AsyncConnection or AsyncSession; "
        f"got {type(conn).__name__} (for a psycopg sync Connection use batchloop.sync)"
    )


__all__ = ["Session", "session_for"]
