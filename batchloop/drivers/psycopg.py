"""psycopg 3 adapters: user connections (async) and scripts (sync)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .. import sql
from ._psycopg import unavailable
from .base import Row, translate

try:
    import psycopg
    from psycopg.pq import TransactionStatus
    from psycopg.rows import dict_row
except ImportError as exc:  # no psycopg, or no libpq for it
    raise unavailable("batchloop's psycopg driver", exc) from exc

log = logging.getLogger("batchloop")


def _params(args: tuple[Any, ...]) -> dict[str, Any]:
    return {f"p{i}": value for i, value in enumerate(args, start=1)}


class PsycopgSession:
    """Over a psycopg AsyncConnection; runs in the caller's transaction, never commits."""

    __slots__ = ("_conn", "schema")

    def __init__(self, conn: psycopg.AsyncConnection[Any], schema: str) -> None:
        self._conn = conn
        self.schema = schema

    @property
    def raw(self) -> Any:
        return self._conn

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        try:
            async with self._conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(sql.pyformat(name, self.schema), _params(args))
                return await cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise (translate(exc, self.schema) or exc) from exc

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        rows = await self.fetch(name, *args)
        return rows[0] if rows else None

    async def fetchval(self, name: str, *args: Any) -> Any:
        row = await self.fetchrow(name, *args)
        return next(iter(row.values())) if row else None

    async def script(self, text: str) -> None:
        await self._conn.execute(text.encode())


def _broken(conn: Any) -> bool:
    return bool(conn.closed or conn.broken)


def _abandon(conn: Any) -> None:
    try:
        if getattr(conn, "pgconn", None) is not None:
            conn.pgconn.finish()
    except Exception as exc:
        log.debug("abandoning a connection failed: %r", exc)


class PsycopgWork:
    """An autocommit psycopg connection ready for one iteration's transaction
    (:class:`~batchloop.drivers.base.WorkConnection`). psycopg sends a query without parameters
    as a simple-protocol message, and reads the connection's real transaction status, so
    ``conn.transaction()`` in user code nests as a savepoint without any help."""

    __slots__ = ("_conn", "_schema", "session")

    sends_text = True

    def __init__(self, conn: Any, schema: str) -> None:
        self._conn = conn
        self._schema = schema
        self.session = PsycopgSession(conn, schema)

    @property
    def raw(self) -> Any:
        return self._conn

    def server_session(self) -> object:
        return self._conn

    async def send(self, text: str) -> str:
        # As str, in the connection's encoding; psycopg leaves "%" alone without parameters.
        cur = await self._conn.execute(text)
        while cur.nextset():
            pass
        return cur.statusmessage or ""

    async def execute(self, query: str, *args: Any) -> str:
        cur = await self._conn.execute(sql.pyformat(query, self._schema), _params(args))
        return cur.statusmessage or ""

    async def begin(self) -> None:
        await self._conn.execute(b"BEGIN ISOLATION LEVEL READ COMMITTED")

    async def commit(self) -> str:
        return await self.send("COMMIT")

    async def rollback(self) -> None:
        if self.in_transaction():
            await self.send("ROLLBACK")

    def began_as_text(self) -> None:
        """psycopg reads the server's transaction status: nothing to tell it."""

    def ended_as_text(self) -> None:
        """psycopg reads the server's transaction status: nothing to tell it."""

    def in_transaction(self) -> bool:
        return bool(self._conn.info.transaction_status != TransactionStatus.IDLE)

    def broken(self) -> bool:
        return _broken(self._conn)

    def abandon(self) -> None:
        _abandon(self._conn)


class PsycopgLoopDriver:
    """Loops whose callables get psycopg AsyncConnections (``Host(driver="psycopg")``)."""

    session = staticmethod(PsycopgSession)
    broken = staticmethod(_broken)
    abandon = staticmethod(_abandon)
    work = staticmethod(PsycopgWork)

    @staticmethod
    def pid(conn: Any) -> int:
        return int(conn.info.backend_pid)


class PsycopgPool:
    """A psycopg_pool.AsyncConnectionPool lending connections the way the loop asks for them."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self.pool.connection() as conn:
            yield conn

    async def close(self) -> None:
        await self.pool.close()


class SyncPsycopgSession:
    """The same over a psycopg sync Connection, for scripts (:mod:`batchloop.sync`)."""

    __slots__ = ("_conn", "schema")

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self._conn = conn
        self.schema = schema

    @property
    def raw(self) -> Any:
        return self._conn

    def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        try:
            with self._conn.cursor(row_factory=dict_row) as cur:
                cur.execute(sql.pyformat(name, self.schema), _params(args))
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise (translate(exc, self.schema) or exc) from exc

    def fetchrow(self, name: str, *args: Any) -> Row | None:
        rows = self.fetch(name, *args)
        return rows[0] if rows else None

    def fetchval(self, name: str, *args: Any) -> Any:
        row = self.fetchrow(name, *args)
        return next(iter(row.values())) if row else None

    def script(self, text: str) -> None:
        self._conn.execute(text.encode())
