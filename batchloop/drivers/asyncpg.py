"""asyncpg adapter: the runtime driver of hosts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from .. import sql
from ..runtime.iteration import SimpleIteration
from .base import Row, translate


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


class Iteration(SimpleIteration):
    """An iteration on an asyncpg connection.

    asyncpg is told that the transaction we begin with our own text is one of its own (the only
    use of its internals here), so ``conn.transaction()`` inside user code still nests as a
    savepoint. When those internals are not as expected, the transaction goes through asyncpg's
    API and the named queries one by one instead.
    """

    def __init__(
        self, conn: Any, schema: str, name: str, generation: int, stop_key: int, *, prepare: bool
    ) -> None:
        super().__init__(conn, schema, name, generation, stop_key, prepare=prepare)
        self._tx = conn.transaction(isolation="read_committed")

    def _new_session(self, conn: Any, schema: str) -> AsyncpgSession:
        return AsyncpgSession(conn, schema)

    @property
    def _can_send_text(self) -> bool:
        return _CAN_ADOPT

    def _session_id(self) -> Any:
        return getattr(self.conn, "_con", None) or self.conn  # a pool's proxy is short-lived

    async def _send(self, text: str) -> str:
        return str(await self.conn.execute(text))

    async def _run(self, query: str, *args: Any) -> str:
        return str(await self.conn.execute(sql.query(query, self._schema), *args))

    async def _begin_plain(self) -> None:
        await self._tx.start()

    async def _commit_plain(self) -> str:
        if _CAN_ADOPT:
            return await self._send("COMMIT")
        await self._tx.commit()
        return "COMMIT"

    def _began(self) -> None:
        self._tx._state = TransactionState.STARTED
        self._tx._connection._top_xact = self._tx

    def _ended(self) -> None:
        if _CAN_ADOPT:
            self._tx._state = TransactionState.COMMITTED
            self._tx._connection._top_xact = None

    def open(self) -> bool:
        return bool(self.conn.is_in_transaction())

    async def rollback(self) -> None:
        if _CAN_ADOPT:
            await self._abort()
        elif self.conn.is_in_transaction():
            await self._tx.rollback()


class AsyncpgLoopDriver:
    """Loops whose callables get asyncpg connections (from the host's asyncpg pool)."""

    name = "asyncpg"

    def session(self, conn: Any, schema: str) -> AsyncpgSession:
        return AsyncpgSession(conn, schema)

    def iteration(
        self, conn: Any, schema: str, name: str, generation: int, stop_key: int, *, prepare: bool
    ) -> Iteration:
        return Iteration(conn, schema, name, generation, stop_key, prepare=prepare)

    def pid(self, conn: Any) -> int:
        return int(conn.get_server_pid())

    def broken(self, conn: Any) -> bool:
        try:
            return bool(conn.is_closed())
        except asyncpg.InterfaceError:
            return True  # asyncpg already released a terminated connection back to its pool


try:
    from asyncpg.transaction import Transaction, TransactionState

    _CAN_ADOPT = all(hasattr(TransactionState, s) for s in ("STARTED", "COMMITTED")) and {
        "_state",
        "_connection",
    } <= set(getattr(Transaction, "__slots__", ()))
except ImportError:  # pragma: no cover - asyncpg reorganised: use the plain statements
    _CAN_ADOPT = False
