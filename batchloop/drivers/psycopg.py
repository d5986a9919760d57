"""psycopg 3 adapters: user connections (async) and scripts (sync)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import dict_row

from .. import sql
from .base import Row, check_committed, closing, translate


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


class PsycopgIteration:
    """An iteration's transaction on an autocommit psycopg connection, begun by us.

    ``BEGIN`` travels with ``book_batch`` and the closing statements with ``COMMIT`` in one
    simple-protocol message each (psycopg sends a query without parameters that way). psycopg
    reads the connection's real transaction status, so ``conn.transaction()`` in user code
    nests as a savepoint without any help.
    """

    def __init__(
        self,
        conn: psycopg.AsyncConnection[Any],
        schema: str,
        name: str,
        generation: int,
        stop_key: int,
    ) -> None:
        self.conn = conn
        self.session = PsycopgSession(conn, schema)
        self._schema = schema
        self._name, self._generation, self._stop_key = name, generation, stop_key

    async def begin(self, revision: int) -> bool:
        key = (self._name, self._generation, revision, self._stop_key)
        book = sql.inline("book_batch", self._schema, *key)
        try:
            if book is None:
                await self.conn.execute(b"BEGIN ISOLATION LEVEL READ COMMITTED")
                return await self.book(revision)
            cur = await self.conn.execute(f"BEGIN ISOLATION LEVEL READ COMMITTED; {book}".encode())
        except BaseException:
            await self.rollback()
            raise
        cur.nextset()
        return cur.rowcount == 1

    async def book(self, revision: int) -> bool:
        key = (self._name, self._generation, revision, self._stop_key)
        cur = await self.conn.execute(sql.pyformat("book_batch", self._schema), _params(key))
        return cur.rowcount == 1

    def open(self) -> bool:
        return self.conn.info.transaction_status != TransactionStatus.IDLE

    async def commit(self, *, unbook: bool, debounce: float = 0.0) -> None:
        parts = closing(self._name, self._generation, unbook=unbook, debounce=debounce)
        inlined = [sql.inline(name, self._schema, *args) for name, args in parts]
        if all(text is not None for text in inlined):
            cur = await self.conn.execute("; ".join([*inlined, "COMMIT"]).encode())  # type: ignore[list-item]
            while cur.nextset():
                pass
        else:
            for name, args in parts:
                await self.conn.execute(sql.pyformat(name, self._schema), _params(args))
            cur = await self.conn.execute(b"COMMIT")
        check_committed(cur.statusmessage or "", self._name)

    async def rollback(self) -> None:
        if self.conn.info.transaction_status in (TransactionStatus.INTRANS, _INERROR):
            await self.conn.execute(b"ROLLBACK")


_INERROR = TransactionStatus.INERROR


class PsycopgLoopDriver:
    """Loops whose callables get psycopg AsyncConnections (``Host(driver="psycopg")``)."""

    name = "psycopg"

    def session(self, conn: Any, schema: str) -> PsycopgSession:
        return PsycopgSession(conn, schema)

    def iteration(
        self, conn: Any, schema: str, name: str, generation: int, stop_key: int
    ) -> PsycopgIteration:
        return PsycopgIteration(conn, schema, name, generation, stop_key)

    def pid(self, conn: Any) -> int:
        return int(conn.info.backend_pid)

    def broken(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)


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
