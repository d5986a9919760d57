"""``drain`` and ``wait_idle``: run a name's loop inside a test, or wait for a host to finish it.

``drain`` is the host-less, lock-less way to test code that pings: it runs the name's registered
work query and worker on the test's own connection, in the test's own transaction, so a test
that rolls back at the end leaves nothing behind. ``wait_idle`` is for tests that run a real
``Host`` (the ``batchloop_host`` fixture) and need to know when it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Sized
from typing import Any

import anyio

from .. import api
from ..drivers import _psycopg
from ..drivers import asyncpg as asyncpg_driver
from ..drivers.sqlalchemy import driver_connection, is_sqlalchemy
from ..errors import BatchloopError, NotRegisteredError, TransactionAborted
from ..models import Debounce, Idle, Work, WorkerStatus
from ..registry import Kind, Registered, lookup
from ..runtime import outcome
from ..schema_name import DEFAULT_SCHEMA, check_name, check_schema

log = logging.getLogger("batchloop")

SAVEPOINT = "batchloop_drain"
POLL_INTERVAL = 0.05
"""How often ``wait_idle`` reads the status (seconds)."""
WAKE_MARGIN = 1.0
"""A waiting name due within this many seconds is not "done": ``ping`` does not wake it (it
relies on the deadline), so rows a ping added meanwhile are processed only when it is due."""


class UnknownWorkerError(BatchloopError, LookupError, ValueError):
    """No worker of that name exists (no ``ping`` for it committed, or in this transaction)."""


class DrainRefused(BatchloopError):
    """``drain`` cannot run this name here (a live host runs it)."""


async def drain(
    conn: Any, name: str, *, max_batches: int = 1000, schema: str = DEFAULT_SCHEMA
) -> int:
    """Run ``name``'s work query and worker on ``conn`` until the query says idle; the number of
    batches processed.

    The callables are the ones stored for ``name`` by its last ``ping``, resolved only through
    this process's registry (import their module first; nothing is imported because a row names
    it). Everything runs on ``conn`` in the caller's transaction, each batch (query plus worker)
    in a savepoint: no host, no locks of batchloop's, and batchloop's own tables are only read,
    so a test that rolls its transaction back leaves nothing. On a connection outside any
    transaction each batch is a transaction of its own, committed when it ends.

    - ``Idle`` (with or without a timeout) ends the drain; cooldown, debounce and ``Debounce``
      returned by the worker are ignored (they are about time; a drain runs to the end now).
    - The stored config's ``iteration_timeout`` applies to each batch.
    - A query or worker that raises: that batch's savepoint rolls back and the exception
      propagates; earlier batches stay (in the caller's transaction).
    - Commit-outcome callbacks (:func:`batchloop.runtime.outcome.on_outcome`) registered during a
      batch are called with True once its savepoint is released (a drain cannot know whether the
      caller's transaction will commit), False once it is rolled back.
    - After ``max_batches`` batches it stops and returns that number, logging a warning (a work
      query that never returns ``Idle`` would otherwise loop for ever).
    - A stopped name runs nothing (0); a name a live host runs is refused
      (:class:`DrainRefused`): two loops would process the same rows; an unknown name raises
      :class:`UnknownWorkerError`.

    ``conn``: an asyncpg Connection (or a pool's connection), a psycopg AsyncConnection, or a
    SQLAlchemy AsyncConnection or AsyncSession on one of those (the callables then get the
    driver's connection underneath, in the session's transaction).

    Example (in a test, with the ``batchloop_dsn`` fixture)::

        conn = await asyncpg.connect(batchloop_dsn)
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO events (value) VALUES (1), (2)")
        await batchloop.ping(conn, "events", next_events, handle_events)
        assert await batchloop.testing.drain(conn, "events") == 1
        assert await conn.fetchval("SELECT count(*) FROM events") == 0
        await tx.rollback()  # nothing stays: not the rows, the batches, nor the ping

    docs/testing.md has a complete test file.
    """
    check_name(name)
    check_schema(schema)
    if isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"max_batches must be an int >= 1, got {max_batches!r}")
    if is_sqlalchemy(conn):
        # Its driver connection, inside the transaction SQLAlchemy has (or now begins) on it;
        # the callables get that connection, as a host's do.
        conn = await driver_connection(conn)
    tx = _transactions(conn)
    current = await api.status(conn, name, schema=schema)
    if current is None:
        raise UnknownWorkerError(
            f"drain: no worker named {name!r} in schema {schema!r}; ping it first (in this "
            "transaction, or in one that committed)"
        )
    if current.state == "stopped":
        log.info("drain: %r is stopped; nothing runs (batchloop.start resumes it)", name)
        return 0
    if current.owner_alive:
        owner = current.owner
        where = f" (host {owner.host_id} on {owner.hostname}, pid {owner.pid})" if owner else ""
        raise DrainRefused(
            f"drain: a live host runs {name!r}{where}; draining it too would run two loops "
            "over the same rows: stop that host (or use wait_idle with it)"
        )
    query = _registered(current.work_query, "work_query", name)
    worker = _registered(current.worker, "worker", name)
    timeout = current.config.iteration_timeout
    batches = 0
    while batches < max_batches:
        if not await _one_batch(tx, name, query, worker, timeout):
            return batches
        batches += 1
    log.warning(
        "drain: %r still had work after max_batches=%d batches; stopped there", name, max_batches
    )
    return batches


def _registered(ref: str, kind: Kind, name: str) -> Registered:
    entry = lookup(ref, kind)
    if entry is None:
        module = ref.split(":", 1)[0]
        raise NotRegisteredError(
            f"drain: {ref}, the {kind} stored for {name!r}, is not registered in this process: "
            f"import {module} first (drain never imports a module because a row names it)"
        )
    return entry


async def _one_batch(
    tx: _Transactions,
    name: str,
    query: Registered,
    worker: Registered,
    timeout: float | None,  # noqa: ASYNC109 - the stored iteration_timeout, applied by _within
) -> bool:
    """One query (and worker, on Work) in a savepoint; whether a batch was processed."""
    conn = tx.conn
    with outcome.collect() as pending:
        try:
            async with tx.batch():
                work = _callables(conn, name, query, worker)
                processed = await (work if timeout is None else _within(timeout, work))
        except BaseException:
            outcome.settle(pending, committed=False)
            raise
        outcome.settle(pending, committed=True)
    return processed


async def _within(seconds: float, work: Awaitable[bool]) -> bool:
    """``work``, cancelled after ``seconds`` (``iteration_timeout``).

    asyncio's timeout cancels once, where an anyio cancel scope keeps cancelling every await
    inside it: psycopg, cancelling its query, would then be cut off again and close the
    caller's connection; this way it finishes the cancel, and the savepoint rolls back."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    try:
        if sys.version_info >= (3, 11):
            async with asyncio.timeout_at(deadline):
                return await work
        return await asyncio.wait_for(work, seconds)
    except (TimeoutError, asyncio.TimeoutError) as exc:
        if loop.time() < deadline:
            raise  # the callables' own TimeoutError, not ours
        raise TimeoutError(f"iteration_timeout ({seconds:g} s) exceeded") from exc


async def _callables(conn: Any, name: str, query: Registered, worker: Registered) -> bool:
    result: object = await query.func(conn, name)
    if isinstance(result, Idle):
        return False
    if not isinstance(result, Work):
        raise TypeError(
            f"work query {query.ref} returned {type(result).__name__}; "
            "return batchloop.Work(batch) or batchloop.Idle()"
        )
    batch = result.batch
    if isinstance(batch, Sized) and len(batch) == 0:
        log.warning(
            "drain: work query %s returned an empty batch for %r; it counts as work (return "
            "batchloop.Idle() when there is nothing to do)",
            query.ref,
            name,
        )
    if worker.batch_adapter is not None:
        try:
            batch = worker.batch_adapter.validate_python(batch)
        except Exception as exc:
            raise TypeError(
                f"batch from {query.ref} does not match the `batch` annotation of "
                f"{worker.ref}: {exc}"
            ) from exc
    ret = await worker.func(conn, batch)
    if ret is not None and not isinstance(ret, Debounce):
        raise TypeError(
            f"worker {worker.ref} returned {type(ret).__name__}; "
            "return None or batchloop.Debounce(seconds)"
        )
    return True


class _Transactions:
    """Savepoints (or, outside a transaction, transactions) on one connection of either driver."""

    def __init__(self, conn: Any, psycopg: bool) -> None:
        self.conn = conn
        self._psycopg = psycopg

    def in_transaction(self) -> bool:
        if self._psycopg:
            from psycopg.pq import TransactionStatus

            return bool(self.conn.info.transaction_status != TransactionStatus.IDLE)
        return asyncpg_driver.in_transaction(self.conn)

    async def _execute(self, statement: str) -> None:
        await self.conn.execute(statement)

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """A savepoint, inside a transaction of the driver's own when none is open (so that
        ``conn.transaction()`` in the callables still nests, and the batch commits at the end)."""
        if self.in_transaction():
            async with self._savepoint():
                yield
            return
        async with self.conn.transaction(), self._savepoint():
            yield

    @contextlib.asynccontextmanager
    async def _savepoint(self) -> AsyncIterator[None]:
        # Plain SQL rather than conn.transaction(): asyncpg refuses that inside a transaction
        # begun with an explicit BEGIN, and a failed RELEASE tells us the batch's transaction
        # was aborted by an error caught inside a callable (asyncpg's COMMIT would not).
        await self._execute(f"SAVEPOINT {SAVEPOINT}")
        try:
            yield
        except BaseException:
            await self._rollback_to()
            raise
        try:
            await self._execute(f"RELEASE SAVEPOINT {SAVEPOINT}")
        except Exception as exc:
            await self._rollback_to()
            raise TransactionAborted(
                f"drain: the batch's savepoint could not be released ({exc}): a statement failed "
                "and its error was caught inside a callable (let it propagate, or catch it "
                "inside `async with conn.transaction():`), or a callable ended the transaction"
            ) from exc

    async def _rollback_to(self) -> None:
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            # Fails only when the transaction is gone (a callable ended it, or the connection
            # was lost): the original error says why.
            await self._execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")


def _transactions(conn: Any) -> _Transactions:
    if asyncpg_driver.is_connection(conn):
        return _Transactions(conn, psycopg=False)
    if _psycopg.psycopg is not None and isinstance(conn, _psycopg.psycopg.AsyncConnection):
        return _Transactions(conn, psycopg=True)
    hint = " (acquire a connection from it)" if asyncpg_driver.is_pool(conn) else ""
    raise TypeError(
        "drain() needs one connection: an asyncpg Connection or a psycopg AsyncConnection, "
        f"got {type(conn).__name__}{hint}"
    )


# --------------------------------------------------------------------------------------------
# wait_idle


def finished(status: WorkerStatus, now: Any) -> bool:
    """Whether a name has no work left: it is ``idle``, or ``waiting`` and not due within
    :data:`WAKE_MARGIN` of ``now`` (the database's clock).

    A ping that committed after the name went idle or waiting made it ``running`` again (a
    waiting name due within a second is the exception: ``ping`` leaves it to its deadline,
    which is why such a name does not count as finished). So a fresh read that is idle or
    waiting-not-due means: nothing pinged since is still unprocessed.
    """
    if status.state == "idle":
        return True
    if status.state != "waiting":
        return False
    due = status.next_run_at
    return due is not None and (due - now).total_seconds() > WAKE_MARGIN


async def wait_idle(
    conn: Any,
    name: str,
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, the documented signature
    *,
    schema: str = DEFAULT_SCHEMA,
) -> WorkerStatus:
    """Return once ``name`` has no work left; its status then. ``TimeoutError`` after
    ``timeout`` seconds otherwise (the message says the last state and error seen).

    "No work left": the state is ``idle``, or ``waiting`` and not due within a second (by the
    database's clock); see :func:`finished`. A host is what makes it so: use this with the
    ``batchloop_host`` fixture (or any running ``Host``), after the pinging transaction
    committed, on a connection whose reads see new commits (READ COMMITTED, the default; not
    inside a REPEATABLE READ transaction). A stopped name never finishes: it times out.

    ``conn``: an asyncpg Connection or Pool, a psycopg AsyncConnection, a SQLAlchemy
    AsyncConnection or AsyncSession on one of those, or a DSN string (a connection is opened
    for the wait).

    Example::

        await batchloop.ping(conn, "events", next_events, handle_events)  # committed
        status = await batchloop.testing.wait_idle(conn, "events", timeout=10)
        assert status.batches >= 1
    """
    check_name(name)
    check_schema(schema)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout >= 0:
        raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
    if isinstance(conn, str):
        from ..connect import connect

        own = await connect(conn, timeout=10.0)
        try:
            return await wait_idle(own, name, timeout, schema=schema)
        finally:
            await own.close()
    deadline = anyio.current_time() + timeout
    while True:
        current = await api.status(conn, name, schema=schema)
        if current is None:
            raise UnknownWorkerError(
                f"wait_idle: no worker named {name!r} in schema {schema!r} (has the pinging "
                "transaction committed?)"
            )
        if finished(current, await _database_now(conn)):
            return current
        if anyio.current_time() >= deadline:
            raise TimeoutError(_still_busy(current, timeout))
        await anyio.sleep(min(POLL_INTERVAL, max(0.0, deadline - anyio.current_time())))


def _still_busy(status: WorkerStatus, timeout: float) -> str:
    detail = f"still {status.state}"
    if status.stale:
        detail += (
            " with no host holding it (is a host with its callables running, and did the "
            "pinging transaction commit?)"
        )
    if status.consecutive_failures:
        error = " ".join((status.last_error or "").split())[:200]
        detail += f", {status.consecutive_failures} consecutive failure(s), last: {error}"
    return f"wait_idle: {status.name!r} {detail} after {timeout:g} s"


async def _database_now(conn: Any) -> Any:
    """``clock_timestamp()`` (``now()`` would be the transaction's start)."""
    statement = "SELECT clock_timestamp()"
    if is_sqlalchemy(conn):
        conn = await driver_connection(conn)
    if asyncpg_driver.is_pool(conn):
        async with conn.acquire() as c:
            return await c.fetchval(statement)
    if asyncpg_driver.is_connection(conn):
        return await conn.fetchval(statement)
    cur = await conn.execute(statement)
    row = await cur.fetchone()
    return row[0]
