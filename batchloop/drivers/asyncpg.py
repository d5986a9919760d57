"""asyncpg adapter: the runtime driver of hosts (the seam is :mod:`batchloop.drivers.base`)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .. import sql
from .base import Row, translate

log = logging.getLogger("batchloop")


class AsyncpgSession:
    __slots__ = ("_conn", "schema")

    def __init__(self, conn: Any, schema: str) -> None:
        self._conn = conn
        self.schema = schema

    @property
    def raw(self) -> Any:
        return self._conn

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        try:
            rows: Sequence[Row] = await self._conn.fetch(sql.query(name, self.schema), *args)
        except asyncpg.PostgresError as exc:
            raise (translate(exc, self.schema) or exc) from exc
        return rows

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        try:
            row: Row | None = await self._conn.fetchrow(sql.query(name, self.schema), *args)
        except asyncpg.PostgresError as exc:
            raise (translate(exc, self.schema) or exc) from exc
        return row

    async def fetchval(self, name: str, *args: Any) -> Any:
        try:
            return await self._conn.fetchval(sql.query(name, self.schema), *args)
        except asyncpg.PostgresError as exc:
            raise (translate(exc, self.schema) or exc) from exc

    async def script(self, text: str) -> None:
        await self._conn.execute(text)


def _broken(conn: Any) -> bool:
    try:
        return bool(conn.is_closed())
    except asyncpg.InterfaceError:
        return True  # asyncpg already released a terminated connection back to its pool


def _abandon(conn: Any) -> None:
    try:
        conn.terminate()  # a pool proxy forwards it
    except Exception as exc:
        log.debug("abandoning a connection failed: %r", exc)


class AsyncpgWork:
    """An asyncpg connection ready for one iteration's transaction
    (:class:`~batchloop.drivers.base.WorkConnection`).

    asyncpg is told that the transaction begun with our own text is one of its own (the only
    use of its internals here), so ``conn.transaction()`` inside user code still nests as a
    savepoint. When those internals are not as expected, the transaction goes through asyncpg's
    API and the named queries one by one instead.
    """

    __slots__ = ("_conn", "_schema", "_tx", "session")

    def __init__(self, conn: Any, schema: str) -> None:
        self._conn = conn
        self._schema = schema
        self.session = AsyncpgSession(conn, schema)
        self._tx = conn.transaction(isolation="read_committed")

    @property
    def raw(self) -> Any:
        return self._conn

    @property
    def sends_text(self) -> bool:
        return _CAN_ADOPT

    def server_session(self) -> object:
        return getattr(self._conn, "_con", None) or self._conn  # a pool's proxy is short-lived

    async def send(self, text: str) -> str:
        return str(await self._conn.execute(text))

    async def execute(self, query: str, *args: Any) -> str:
        return str(await self._conn.execute(sql.query(query, self._schema), *args))

    async def begin(self) -> None:
        await self._tx.start()

    async def commit(self) -> str:
        if _CAN_ADOPT:
            return await self.send("COMMIT")
        await self._tx.commit()
        return "COMMIT"

    async def rollback(self) -> None:
        if _CAN_ADOPT:
            if self.in_transaction():
                await self.send("ROLLBACK")
            self.ended_as_text()
        elif self.in_transaction():
            await self._tx.rollback()

    def began_as_text(self) -> None:
        self._tx._state = TransactionState.STARTED
        self._tx._connection._top_xact = self._tx

    def ended_as_text(self) -> None:
        if _CAN_ADOPT:
            self._tx._state = TransactionState.COMMITTED
            self._tx._connection._top_xact = None

    def in_transaction(self) -> bool:
        return bool(self._conn.is_in_transaction())

    def broken(self) -> bool:
        return _broken(self._conn)

    def abandon(self) -> None:
        _abandon(self._conn)


class AsyncpgLoopDriver:
    """Loops whose callables get asyncpg connections (from the host's asyncpg pool)."""

    session = staticmethod(AsyncpgSession)
    broken = staticmethod(_broken)
    abandon = staticmethod(_abandon)
    work = staticmethod(AsyncpgWork)

    @staticmethod
    def pid(conn: Any) -> int:
        return int(conn.get_server_pid())


def is_connection(conn: object) -> bool:
    """An asyncpg Connection, or a pool's proxy of one."""
    return isinstance(conn, asyncpg.Connection | PoolConnectionProxy)


def is_pool(conn: object) -> bool:
    return isinstance(conn, asyncpg.Pool)


def in_transaction(conn: Any) -> bool:
    """Whether ``conn`` (see :func:`is_connection`) is inside a transaction."""
    return bool(conn.is_in_transaction())


async def roll_back(conn: Any) -> None:
    """End whatever transaction is open on ``conn`` (an iteration cut off mid-way)."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


try:
    from asyncpg.transaction import Transaction, TransactionState

    _CAN_ADOPT = all(hasattr(TransactionState, s) for s in ("STARTED", "COMMITTED")) and {
        "_state",
        "_connection",
    } <= set(getattr(Transaction, "__slots__", ()))
except ImportError:  # pragma: no cover - asyncpg reorganised: use the plain statements
    _CAN_ADOPT = False
