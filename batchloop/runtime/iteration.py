"""One loop iteration's transaction, in as few round trips and as little server work as we can.

``BEGIN`` travels with the bookkeeping fence (``book_batch``) in one simple-protocol message, and
the closing statements travel with ``COMMIT``: no round trip of ours per batch beyond the two a
transaction needs anyway. ``book_batch`` is prepared once per server session (``PREPARE``, then
``EXECUTE`` in that message), so the server plans it once instead of on every batch; that is
most of what a batch costs batchloop on the server. Behind a transaction pooler, where a client
connection changes server sessions, it is sent inlined instead. Both texts are built once per
loop. The drivers supply the I/O: :class:`SimpleIteration` is everything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import weakref
from abc import ABC, abstractmethod
from functools import cache, lru_cache
from typing import Any

import anyio

from .. import sql
from ..drivers.base import Session
from ..errors import TransactionAborted

CLEANUP_TIMEOUT = 2.0
"""How long a cleanup step (a rollback) may wait on the server: a frozen one never answers.
Short, because giving up is safe: the connection is then closed, which rolls back too."""

DUPLICATE_PREPARED = "42P05"
UNKNOWN_PREPARED = "26000"

_PREPARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
"""Connections whose server session holds our prepared ``book_batch``, by schema."""


@cache
def _book_statement(schema: str) -> tuple[str, str]:
    """The prepared statement's name (unique to the query's text) and its ``PREPARE``."""
    text = sql.query("book_batch", schema)
    name = "batchloop_book_" + hashlib.sha1(text.encode()).hexdigest()[:16]
    return name, f"PREPARE {name} AS {text}"


@lru_cache(maxsize=4096)
def _begin_text(
    schema: str, name: str, generation: int, revision: int, stop_key: int, prepared: bool
) -> str | None:
    """``BEGIN`` and ``book_batch``, executed or inlined; None if a value cannot be inlined."""
    args = (name, generation, revision, stop_key)
    if prepared:
        literals = [sql.literal(a) for a in args]
        if any(lit is None for lit in literals):
            return None
        book: str | None = f"EXECUTE {_book_statement(schema)[0]}({', '.join(literals)})"  # type: ignore[arg-type]
    else:
        book = sql.inline("book_batch", schema, *args)
    return None if book is None else f"BEGIN ISOLATION LEVEL READ COMMITTED; {book}"


@lru_cache(maxsize=4096)
def _commit_text(
    schema: str, name: str, generation: int, unbook: bool, debounce: float
) -> str | None:
    parts = closing(name, generation, unbook=unbook, debounce=debounce)
    inlined = [sql.inline(query, schema, *args) for query, args in parts]
    if any(text is None for text in inlined):
        return None
    return "; ".join([*inlined, "COMMIT"])  # type: ignore[list-item]


def closing(
    name: str, generation: int, *, unbook: bool, debounce: float
) -> list[tuple[str, tuple[object, ...]]]:
    """The named queries (with arguments) an iteration sends with its ``COMMIT``."""
    if unbook:
        return [("unbook_batch", (name, generation))]
    if debounce > 0:
        return [("debounce", (name, generation, float(debounce)))]
    return []


def check_committed(tag: str, name: str) -> None:
    """PostgreSQL answers COMMIT of a failed transaction with ROLLBACK, not an error."""
    if tag != "COMMIT":
        raise TransactionAborted(
            f"loop {name!r}: the iteration's transaction was rolled back at COMMIT ({tag}): a "
            "statement in it failed and its error was caught inside a callable; let it "
            "propagate, or catch it inside `async with conn.transaction():` (a savepoint)"
        )


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(exc, "sqlstate", None)


class SimpleIteration(ABC):
    """The driver-independent part of an iteration; subclasses do the I/O."""

    session: Session

    def __init__(
        self,
        conn: Any,
        schema: str,
        name: str,
        generation: int,
        stop_key: int,
        *,
        prepare: bool,
    ) -> None:
        self.conn = conn
        self.session = self._new_session(conn, schema)
        self._schema = schema
        self._name, self._generation, self._stop_key = name, generation, stop_key
        self._prepare = prepare
        self._simple = False
        """Whether BEGIN went as our own text (so COMMIT may go the same way)."""

    # ---- the driver's part

    @property
    def _can_send_text(self) -> bool:
        """Whether this iteration may send BEGIN and COMMIT as text of its own."""
        return True

    @abstractmethod
    def _new_session(self, conn: Any, schema: str) -> Session:
        """The driver's Session over ``conn``, for the named queries inside the iteration."""

    @abstractmethod
    def _session_id(self) -> Any:
        """The object that lives as long as the server session (for prepared statements)."""

    @abstractmethod
    async def _send(self, text: str) -> str:
        """Run parameterless statements in one message; the last one's command tag."""

    @abstractmethod
    async def _run(self, query: str, *args: Any) -> str:
        """Run the named query with parameters; its command tag."""

    @abstractmethod
    async def _begin_plain(self) -> None:
        """BEGIN (READ COMMITTED) the driver's own way."""

    async def _commit_plain(self) -> str:
        return await self._send("COMMIT")

    def _began(self) -> None:  # noqa: B027 - a hook: only asyncpg needs to be told
        """BEGIN was sent as text."""

    def _ended(self) -> None:  # noqa: B027
        """The transaction ended by text the driver did not see."""

    @abstractmethod
    def open(self) -> bool:
        """Whether the transaction is still open (user code must not end it)."""

    # ---- the iteration

    async def begin(self, revision: int) -> bool:
        """Open the transaction and book a batch; False if the fence did not match."""
        key = (self._schema, self._name, self._generation, revision, self._stop_key)
        text, prepared = None, False
        if self._can_send_text:
            prepared = self._prepare and await self._prepared()
            text = _begin_text(*key, prepared)
        if text is None:
            await self._begin_plain()
            try:
                return await self.book(revision)
            except BaseException:
                await self.rollback()
                raise
        try:
            try:
                tag = await self._send(text)
            except Exception as exc:
                if not prepared or _sqlstate(exc) != UNKNOWN_PREPARED:
                    raise
                # Deallocated under us (DEALLOCATE ALL, DISCARD ALL): inline it this time.
                _PREPARED.pop(self._session_id(), None)
                await self._abort()
                tag = await self._send(_begin_text(*key, False) or "")
        except BaseException:
            with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                # The connection went (asyncpg may even have released it to the pool, which
                # makes any call on it fail): the original error says why.
                with contextlib.suppress(Exception):
                    await self._abort()
            raise
        self._simple = True
        self._began()
        return tag == "UPDATE 1"

    async def _prepared(self) -> bool:
        """Whether ``book_batch`` is prepared in this session, preparing it if not."""
        session = self._session_id()
        if self._schema in _PREPARED.get(session, ()):
            return True
        try:
            await self._send(_book_statement(self._schema)[1])
        except Exception as exc:
            state = _sqlstate(exc)
            if state is None:
                raise  # the connection, not the statement
            if state != DUPLICATE_PREPARED:
                return False  # e.g. the schema is missing: the inlined text will say so
        _PREPARED.setdefault(session, set()).add(self._schema)
        return True

    async def book(self, revision: int) -> bool:
        """``book_batch`` with parameters (after the full fence sorted things out)."""
        tag = await self._run("book_batch", self._name, self._generation, revision, self._stop_key)
        return tag == "UPDATE 1"

    async def commit(self, *, unbook: bool, debounce: float = 0.0) -> None:
        """Commit; ``unbook`` when no batch was processed, ``debounce`` to delay the next run."""
        text = None
        if self._simple:
            text = _commit_text(self._schema, self._name, self._generation, unbook, debounce)
        if text is not None:
            tag = await self._send(text)
        else:
            for query, args in closing(
                self._name, self._generation, unbook=unbook, debounce=debounce
            ):
                await self._run(query, *args)
            tag = await self._commit_plain()
        self._ended()
        check_committed(tag, self._name)

    async def _abort(self) -> None:
        if self.open():
            await self._send("ROLLBACK")
        self._ended()

    async def rollback(self) -> None:
        await self._abort()
