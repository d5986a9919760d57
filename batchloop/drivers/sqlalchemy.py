"""SQLAlchemy connections and sessions as batchloop connections (extra ``sqlalchemy``).

The calls of :mod:`batchloop` (``ping``, ``stop``, ``start``, ``wake``, ``status``,
``list_workers``, ``list_hosts``) accept a SQLAlchemy ``AsyncConnection`` or ``AsyncSession`` on
``postgresql+asyncpg`` or ``postgresql+psycopg``, and those of :mod:`batchloop.sync` a
``Connection`` or ``Session`` on ``postgresql+psycopg`` (psycopg 3). They run on the driver
connection underneath, inside the transaction SQLAlchemy has open on it, so the caller's
``commit()`` commits them with the rest of the transaction and a ``rollback()`` undoes them::

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine("postgresql+asyncpg://user@host/db")
    async with AsyncSession(engine) as session, session.begin():   # commits at the end
        await session.execute(text("INSERT INTO events(value) VALUES (1)"))
        await bl.ping(session, "events", next_events, handle_events)

This module is imported only when such an object is passed, so SQLAlchemy stays optional.
"""

from __future__ import annotations

from typing import Any

SUPPORTED_ASYNC = "postgresql+asyncpg or postgresql+psycopg"
SUPPORTED_SYNC = "postgresql+psycopg (psycopg 3)"


def is_sqlalchemy(conn: object) -> bool:
    """Whether ``conn`` is (or subclasses) a SQLAlchemy object, without importing SQLAlchemy."""
    return any(c.__module__.startswith("sqlalchemy.") for c in type(conn).__mro__)


async def driver_connection(conn: Any) -> Any:
    """The asyncpg or psycopg connection under a SQLAlchemy ``AsyncConnection`` or
    ``AsyncSession``, inside the transaction SQLAlchemy has (or now begins) on it."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_scoped_session

    if isinstance(conn, async_scoped_session):
        conn = conn()
    if isinstance(conn, AsyncSession):
        conn = await conn.connection()  # begins the session's transaction if it had none
    if not isinstance(conn, AsyncConnection):
        raise TypeError(
            f"a SQLAlchemy {type(conn).__name__} is not supported: pass an AsyncConnection or "
            f"AsyncSession on {SUPPORTED_ASYNC} (or use batchloop.sync for sync ones)"
        )
    raw = (await conn.get_raw_connection()).driver_connection
    if not (_is_asyncpg(raw) or _is_psycopg(raw, "AsyncConnection")):
        raise TypeError(
            f"batchloop needs a SQLAlchemy AsyncConnection on {SUPPORTED_ASYNC}, "
            f"got dialect {conn.dialect.name}+{conn.dialect.driver}"
        )
    if not conn.in_transaction() or not _in_transaction(raw):
        # SQLAlchemy begins lazily: without a statement of its own, its transaction may not
        # have begun (then the caller's commit() would be a no-op and the ping lost) and the
        # asyncpg adapter sends BEGIN only with its first statement (the ping would autocommit
        # and survive a rollback). A statement through SQLAlchemy begins both, as the
        # caller's own first statement would. In AUTOCOMMIT isolation it begins neither, and
        # the calls autocommit, as on a bare connection outside a transaction.
        await conn.exec_driver_sql("SELECT 1")
    return raw


def sync_driver_connection(conn: Any) -> Any:
    """The psycopg 3 ``Connection`` under a SQLAlchemy ``Connection`` or ``Session``, inside
    the transaction SQLAlchemy has (or now begins) on it."""
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, scoped_session

    if isinstance(conn, scoped_session):
        conn = conn()
    if isinstance(conn, Session):
        conn = conn.connection()
    if not isinstance(conn, Connection):
        raise TypeError(
            f"a SQLAlchemy {type(conn).__name__} is not supported by batchloop.sync: pass a "
            f"Connection or Session on {SUPPORTED_SYNC} (async ones go to the batchloop API)"
        )
    raw = conn.connection.driver_connection
    if not _is_psycopg(raw, "Connection"):
        raise TypeError(
            f"batchloop.sync needs a SQLAlchemy Connection on {SUPPORTED_SYNC}, "
            f"got dialect {conn.dialect.name}+{conn.dialect.driver}"
        )
    if not conn.in_transaction() or not _in_transaction(raw):
        # As above: make SQLAlchemy's own transaction begin, so its commit() covers the call.
        conn.exec_driver_sql("SELECT 1")
    return raw


def _is_asyncpg(raw: object) -> bool:
    from .asyncpg import is_connection

    return is_connection(raw)


def _is_psycopg(raw: object, cls: str) -> bool:
    try:
        import psycopg
    except ImportError:  # no libpq: SQLAlchemy could not have connected with psycopg either
        return False
    return isinstance(raw, getattr(psycopg, cls))


def _in_transaction(raw: Any) -> bool:
    if _is_asyncpg(raw):
        return bool(raw.is_in_transaction())
    from psycopg.pq import TransactionStatus

    return bool(raw.info.transaction_status != TransactionStatus.IDLE)
