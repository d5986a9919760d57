"""asyncpg adapter: the runtime driver of hosts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from .. import sql
from .base import Row, check_committed, closing, translate


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


class Iteration:
    """One loop iteration's transaction, in as few round trips as asyncpg allows.

    ``BEGIN`` travels with the bookkeeping fence (``book_batch``) and the closing statements
    with ``COMMIT``, as simple-protocol statements with their parameters inlined: no round trip
    of ours per batch beyond the two a transaction needs anyway. asyncpg is told that the
    transaction is one of its own (the only use of its internals here), so ``conn.transaction()``
    inside user code still nests as a savepoint. When those internals are not as expected, or a
    value cannot be inlined safely, it sends the same named queries one by one instead.
    """

    def __init__(self, conn: Any, schema: str, name: str, generation: int, stop_key: int) -> None:
        self.conn = conn
        self.session = AsyncpgSession(conn, schema)
        self._schema = schema
        self._name, self._generation, self._stop_key = name, generation, stop_key
        self._tx = conn.transaction(isolation="read_committed")
        self._inlined = False

    def _sql(self, name: str, *args: object) -> str | None:
        return sql.inline(name, self._schema, *args) if _CAN_ADOPT else None

    async def begin(self, revision: int) -> bool:
        """Open the transaction and book a batch; False if the fence did not match."""
        key = (self._name, self._generation, revision, self._stop_key)
        book = self._sql("book_batch", *key)
        if book is None:
            await self._tx.start()
            try:
                return await self.book(revision)
            except BaseException:
                await self._tx.rollback()
                raise
        try:
            tag = await self.conn.execute(f"BEGIN ISOLATION LEVEL READ COMMITTED; {book}")
        except BaseException:
            if self.conn.is_in_transaction():
                await self.conn.execute("ROLLBACK")
            raise
        _adopt(self._tx)
        self._inlined = True
        return bool(tag == "UPDATE 1")

    async def book(self, revision: int) -> bool:
        """``book_batch`` as a prepared statement (after the full fence sorted things out)."""
        tag = await self.conn.execute(
            sql.query("book_batch", self._schema),
            self._name,
            self._generation,
            revision,
            self._stop_key,
        )
        return bool(tag == "UPDATE 1")

    async def commit(self, *, unbook: bool, debounce: float = 0.0) -> None:
        parts = closing(self._name, self._generation, unbook=unbook, debounce=debounce)
        if self._inlined:
            inlined = [self._sql(name, *args) for name, args in parts]
            if all(text is not None for text in inlined):
                tag = await self.conn.execute("; ".join([*inlined, "COMMIT"]))  # type: ignore[list-item]
                _ended(self._tx)
                check_committed(tag, self._name)
                return
        for name, args in parts:
            await self.conn.execute(sql.query(name, self._schema), *args)
        if not _CAN_ADOPT:
            await self._tx.commit()
            return
        tag = await self.conn.execute("COMMIT")
        _ended(self._tx)
        check_committed(tag, self._name)

    def open(self) -> bool:
        return bool(self.conn.is_in_transaction())

    async def rollback(self) -> None:
        if _CAN_ADOPT and not self.conn.is_in_transaction():
            _ended(self._tx)  # user code ended it: nothing left to roll back
            return
        await self._tx.rollback()


class AsyncpgLoopDriver:
    """Loops whose callables get asyncpg connections (from the host's asyncpg pool)."""

    name = "asyncpg"

    def session(self, conn: Any, schema: str) -> AsyncpgSession:
        return AsyncpgSession(conn, schema)

    def iteration(
        self, conn: Any, schema: str, name: str, generation: int, stop_key: int
    ) -> Iteration:
        return Iteration(conn, schema, name, generation, stop_key)

    def pid(self, conn: Any) -> int:
        return int(conn.get_server_pid())

    def broken(self, conn: Any) -> bool:
        return bool(conn.is_closed())


try:
    from asyncpg.transaction import Transaction, TransactionState

    _CAN_ADOPT = all(hasattr(TransactionState, s) for s in ("STARTED", "COMMITTED")) and {
        "_state",
        "_connection",
    } <= set(getattr(Transaction, "__slots__", ()))
except ImportError:  # pragma: no cover - asyncpg reorganised: use the plain statements
    _CAN_ADOPT = False


def _adopt(tx: Any) -> None:
    """Make asyncpg treat the transaction we began ourselves as ``tx``, started."""
    tx._state = TransactionState.STARTED
    tx._connection._top_xact = tx


def _ended(tx: Any) -> None:
    tx._state = TransactionState.COMMITTED
    tx._connection._top_xact = None
