"""``tick``: one bounded drain pass without a long-lived host, for cron jobs and serverless.

It claims each due name exactly like a host would (session lock, generation bump), so it never
runs beside a live loop, drains it without cooldown polling until the work query says idle or
the budget runs out, and releases it. A name whose iteration fails is reported and left for the
next tick (or a host), with its failure recorded in ``status``. (No protocol section of its
own: it claims as "Notifications and their loss" describes, and runs the host's loop.)
"""

from __future__ import annotations

import numbers
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import anyio

from ..connect import check_dedicated_session, connect
from ..drivers import _psycopg
from ..drivers import asyncpg as asyncpg_driver
from ..drivers.asyncpg_control import AsyncpgControl
from ..errors import BatchloopError
from ..migrations import code_version, refuse_newer
from ..models import TickFailure, TickReport
from ..registry import lookup, refs
from ..schema_name import DEFAULT_SCHEMA, check_name, check_schema
from .iteration import LoadedWorker
from .loop import LoopContext, NameLoop
from .session import Control

_DRIVER = asyncpg_driver.AsyncpgLoopDriver()
"""tick runs on asyncpg: its own connection, or the caller's (checked by _check_connection)."""


class _OneConnection:
    """Lends the tick's single connection to the loop, one iteration at a time."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        yield self._conn


async def tick(
    dsn_or_conn: Any = None,
    names: Iterable[str] | None = None,
    *,
    budget: float = 10.0,
    schema: str = DEFAULT_SCHEMA,
) -> TickReport:
    """Drain the due names (or just ``names``) once, within about ``budget`` seconds.

    ``dsn_or_conn``: a DSN (None: the ``PG*`` environment) or an asyncpg Connection, which must
    not be inside a transaction. The work queries and workers must be registered in this process
    (import their modules first). Returns which names were checked, drained, busy or failed.
    """
    check_schema(schema)
    wanted = None if names is None else {check_name(n) for n in _names(names)}
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be a number of seconds, got {type(budget).__name__}")
    if not budget > 0:
        raise ValueError(f"budget must be > 0 seconds, got {budget!r}")
    if dsn_or_conn is not None and not isinstance(dsn_or_conn, str):
        _check_connection(dsn_or_conn)
    if dsn_or_conn is None or isinstance(dsn_or_conn, str):
        conn = await connect(dsn_or_conn, timeout=10.0)
        try:
            await check_dedicated_session(conn, dsn_or_conn)
            return await _tick(conn, wanted, budget, schema)
        finally:
            await conn.close()
    return await _tick(dsn_or_conn, wanted, budget, schema)


def _names(names: object) -> Iterable[object]:
    # A str is an iterable of names too: "events" would drain "e", "v", "n", ...
    if isinstance(names, str | bytes) or not isinstance(names, Iterable):
        raise TypeError(
            f"names must be a list of worker names (e.g. [{names!r}]) or None for every due "
            f"name, got {type(names).__name__}"
        )
    return names


def _check_connection(conn: object) -> None:
    """Only an asyncpg connection outside a transaction: the loop sends its own BEGIN and
    COMMIT on it, which would commit (or roll back) the caller's open transaction."""
    if not asyncpg_driver.is_connection(conn):
        hint = ""
        if asyncpg_driver.is_pool(conn):
            hint = " (acquire a connection from the pool, or pass the DSN)"
        elif _psycopg.is_connection(conn):
            hint = " (psycopg connections are not supported here: pass the DSN)"
        raise TypeError(
            "tick() takes a DSN string, None (the PG* environment) or an asyncpg Connection, "
            f"got {type(conn).__name__}{hint}"
        )
    if asyncpg_driver.in_transaction(conn):
        raise BatchloopError(
            "tick() needs a connection outside any transaction: it runs and commits "
            "transactions of its own on it, which would commit yours; call it after your "
            "transaction ends, or pass a DSN so it opens a connection of its own"
        )


async def _tick(conn: Any, wanted: set[str] | None, budget: float, schema: str) -> TickReport:
    deadline = anyio.current_time() + budget
    control = Control(AsyncpgControl(conn), schema)
    try:
        return await _drain(control, wanted, deadline)
    finally:
        control.detach()


async def _drain(control: Control, wanted: set[str] | None, deadline: float) -> TickReport:
    conn, schema = control.conn, control.schema
    report = TickReport()
    refuse_newer(await control.fetchval("check_version", code_version()), schema)
    tick_id = "tick-" + uuid.uuid4().hex[:11]
    rows = await control.fetch("orphans", 100_000, refs("work_query"), refs("worker"))
    due = [
        r["name"]
        for r in rows
        if r["stale_owner"] is None and (wanted is None or r["name"] in wanted)
    ]
    report.checked = sorted(due) if wanted is None else sorted(wanted)
    if wanted is not None:
        await _classify_not_due(conn, schema, wanted - set(due), report)

    async def release(loop: NameLoop) -> None:
        await asyncpg_driver.roll_back(conn)  # only if an iteration was cut off mid-way
        await control.fetchval("unlock", [loop.lock_key])

    for name in due:
        if anyio.current_time() >= deadline:
            break
        row = await control.fetchrow("claim", name, tick_id)
        if row is None:
            report.busy.append(name)
            continue
        try:
            loaded = LoadedWorker.from_row(row)
        except Exception as exc:
            await control.fetchval("unlock", [row["lock_key"]])
            report.failed.append(TickFailure(name=name, error=str(exc)))
            continue
        ctx = LoopContext(_OneConnection(conn), schema, release, _DRIVER, owner=tick_id)
        loop = NameLoop.claimed(ctx, name, row, loaded, once=True, deadline=deadline)
        try:
            await loop.run()
        finally:
            report.batches += loop.batches
            if loop.outcome in ("idle", "waiting", "stopped"):
                report.drained.append(name)
            elif loop.outcome == "failed":
                report.failed.append(TickFailure(name=name, error=loop.last_error or "?"))
    return report


async def _classify_not_due(conn: Any, schema: str, names: set[str], report: TickReport) -> None:
    """Asked-for names that are not claimable: quiet (nothing to do), busy, or unrunnable here."""
    s = _DRIVER.session(conn, schema)
    for name in sorted(names):
        row = await s.fetchrow("status", name)
        if row is None:
            report.failed.append(
                TickFailure(name=name, error=f"no worker named {name!r} in schema {schema!r}")
            )
            continue
        if row["status"] in ("idle", "stopped", "waiting"):
            continue  # nothing to do (a waiting name not yet due included)
        if lookup(row["work_query"], "work_query") and lookup(row["worker"], "worker"):
            report.busy.append(name)
        else:
            report.failed.append(
                TickFailure(name=name, error="its callables are not registered in this process")
            )
