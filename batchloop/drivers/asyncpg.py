"""asyncpg adapter: the runtime driver of hosts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from .. import sql
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


def _literal(value: object) -> str | None:
    """``value`` as an SQL literal, or None if it cannot be inlined safely."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    if isinstance(value, str):
        # Dollar quoting does not depend on standard_conforming_strings.
        if "$bl$" in value or "\x00" in value or value.endswith("$"):
            return None
        return f"$bl${value}$bl$"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _inline(text: str, args: tuple[object, ...]) -> str | None:
    literals = [_literal(a) for a in args]
    if any(lit is None for lit in literals):
        return None
    for n in range(len(literals), 0, -1):  # $10 before $1
        text = text.replace(f"${n}", literals[n - 1])  # type: ignore[arg-type]
    return text


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
        return _inline(sql.query(name, self._schema), args) if _CAN_ADOPT else None

    async def begin(self, revision: int) -> bool:
        """Open the transaction and book a batch; False if the fence did not match."""
        key = (self._name, self._generation, revision, self._stop_key)
        book = self._sql("book_batch", *key)
        if book is None:
            await self._tx.start()
            return await self.book(revision)
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
        """Commit; ``unbook`` when no batch was processed, ``debounce`` to delay the next run."""
        parts: list[tuple[str, tuple[object, ...]]] = []
        if unbook:
            parts.append(("unbook_batch", (self._name, self._generation)))
        elif debounce > 0:
            parts.append(("debounce", (self._name, self._generation, float(debounce))))
        if self._inlined:
            inlined = [self._sql(name, *args) for name, args in parts]
            if all(text is not None for text in inlined):
                await self.conn.execute("; ".join([*inlined, "COMMIT"]))  # type: ignore[list-item]
                _committed(self._tx)
                return
        for name, args in parts:
            await self.conn.execute(sql.query(name, self._schema), *args)
        await self._tx.commit()

    async def rollback(self) -> None:
        await self._tx.rollback()


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


def _committed(tx: Any) -> None:
    tx._state = TransactionState.COMMITTED
    tx._connection._top_xact = None
