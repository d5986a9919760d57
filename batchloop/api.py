"""The calls users make from their own transactions: ping, stop, start, status, and migrate.

Each is described once in :mod:`batchloop.calls`; this module runs the descriptions on an async
driver's session (asyncpg, or a psycopg AsyncConnection), as :mod:`batchloop.sync` does on a
sync one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from . import calls, observe
from .calls import PingResult
from .drivers import session_for
from .models import Config, HostStatus, WorkerStatus
from .observe import tracing
from .plans import Plan, run
from .schema_name import DEFAULT_SCHEMA, check_schema

log = logging.getLogger("batchloop")
T = TypeVar("T")

__all__ = [
    *("PingResult", "list_hosts", "list_workers", "migrate", "ping", "start", "status", "stop"),
    "wake",
]


async def ping(
    conn: Any,
    name: str,
    work_query: Callable[..., Any],
    worker: Callable[..., Any],
    *,
    config: Config | None = None,
    schema: str = DEFAULT_SCHEMA,
) -> PingResult:
    """Make sure the loop ``name`` will see the work this transaction inserts.

    Call it in the inserting transaction. Creates the worker on first use, stores changed
    callables or config (without ``config`` the stored one is kept), wakes an idle or waiting
    worker; a no-op, writing nothing, while the worker runs or is stopped (then it returns
    ``"stopped"``).
    """
    plan = calls.ping(name, work_query, worker, config, schema)  # validates before the span
    started = time.perf_counter()
    with tracing.ping_span(name) as span:
        result = await _run(conn, schema, plan)
        tracing.ping_result(span, result)
    if observe.observers:
        observe.emit_ping(observe.PingEvent(name, result, time.perf_counter() - started))
    return result


async def stop(conn: Any, name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Stop ``name``: once this commits no more batches commit, and pings are ignored.

    Waits for an in-flight batch to commit or roll back. Returns False when there is no such
    worker; idempotent otherwise.
    """
    return await _run(conn, schema, calls.stop(name, schema))


async def start(conn: Any, name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Resume a stopped worker with its stored callables and config; otherwise a no-op.

    Returns False when there is no such worker.
    """
    return await _run(conn, schema, calls.start(name, schema))


async def wake(conn: Any, name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Run ``name``'s loop now: clears a failure backoff or a Debounce, wakes an idle or
    waiting worker (its owner's loop re-arms at once, or a host claims it once this commits).

    Returns False for an unknown or stopped name (see :func:`start`).
    """
    return await _run(conn, schema, calls.wake(name, schema))


async def list_hosts(conn: Any, *, schema: str = DEFAULT_SCHEMA) -> list[HostStatus]:
    """Every registered host, oldest first, with whether it is alive and the names it owns."""
    return await _run(conn, schema, calls.list_hosts(schema))


async def status(conn: Any, name: str, *, schema: str = DEFAULT_SCHEMA) -> WorkerStatus | None:
    """The worker ``name``, or None if no ping ever created it."""
    return await _run(conn, schema, calls.status(name, schema))


async def list_workers(conn: Any, *, schema: str = DEFAULT_SCHEMA) -> list[WorkerStatus]:
    """Every worker, ordered by name."""
    return await _run(conn, schema, calls.list_workers(schema))


async def migrate(dsn_or_conn: Any = None, *, schema: str = DEFAULT_SCHEMA) -> list[int]:
    """Create or upgrade the batchloop schema; returns the versions applied (idempotent).

    ``dsn_or_conn``: a DSN string (None: the ``PG*`` environment), or an asyncpg Connection or
    psycopg AsyncConnection. Safe when several processes migrate at once.
    """
    check_schema(schema)
    if dsn_or_conn is None or isinstance(dsn_or_conn, str):
        from .connect import connect

        conn = await connect(dsn_or_conn, timeout=10.0)
        try:
            return await migrate(conn, schema=schema)
        finally:
            await conn.close()
    plan = calls.migrate(schema)
    async with session_for(dsn_or_conn, schema) as s, s.raw.transaction():
        done = await run(s, plan)
    if done:
        log.info("migrated schema %s: applied %s", schema, done)
    return done


async def _run(conn: Any, schema: str, plan: Plan[T]) -> T:
    async with session_for(conn, schema) as s:
        return await run(s, plan)
