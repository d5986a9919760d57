"""Thin adapters from database drivers to the one small interface batchloop needs.

The loop, the host and the API speak only :class:`~batchloop.drivers.base.Session`; each
driver module maps named queries and errors for one client library.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .base import Session


@asynccontextmanager
async def session_for(conn: Any, schema: str) -> AsyncIterator[Session]:
    """A Session over an asyncpg Connection or Pool, or a psycopg AsyncConnection."""
    import asyncpg

    if isinstance(conn, asyncpg.Pool):
        async with conn.acquire() as c:
            from .asyncpg import AsyncpgSession

            yield AsyncpgSession(c, schema)
        return
    if isinstance(conn, asyncpg.Connection) or _is_asyncpg_proxy(conn):
        from .asyncpg import AsyncpgSession

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
    raise TypeError(
        "conn must be an asyncpg Connection or Pool, or a psycopg AsyncConnection; "
        f"got {type(conn).__name__} (for a psycopg sync Connection use batchloop.sync)"
    )


def _is_asyncpg_proxy(conn: Any) -> bool:
    from asyncpg.pool import PoolConnectionProxy

    return isinstance(conn, PoolConnectionProxy)


__all__ = ["Session", "session_for"]
