"""Registered callables for tests/test_testing_kit.py, written for both drivers: asyncpg
connections (``$n`` parameters, ``fetch``) and psycopg AsyncConnections (``%s``, ``execute``).

The table: ``kit_items (id bigserial, queue text)``; processed ids go to ``kit_done``.
"""

from __future__ import annotations

import contextlib
from typing import Any

import batchloop as bl
from batchloop.runtime.outcome import on_outcome

SCHEMA = """
CREATE TABLE kit_items (id bigserial PRIMARY KEY, queue text NOT NULL);
CREATE TABLE kit_done (id bigint PRIMARY KEY, queue text NOT NULL);
"""
BATCH = 2
OUTCOMES: list[tuple[list[int], bool]] = []
"""(batch, committed) for every commit-outcome callback, in the order they were called."""
FAIL_AT: dict[str, int] = {}
"""queue -> the 1-based batch at which ``move`` raises (once)."""
DEBOUNCE: set[str] = set()
"""Queues whose worker returns ``Debounce(30.0)`` (a host would wait; drain ignores it)."""
SWALLOW: set[str] = set()
"""Queues whose worker runs a failing statement and catches its error (no savepoint)."""
CALLS: dict[str, int] = {}


def _psycopg(conn: Any) -> bool:
    return not hasattr(conn, "fetchval")


async def _ids(conn: Any, queue: str) -> list[int]:
    if _psycopg(conn):
        cur = await conn.execute(
            "SELECT id FROM kit_items WHERE queue = %s ORDER BY id LIMIT %s", (queue, BATCH)
        )
        return [r[0] for r in await cur.fetchall()]
    rows = await conn.fetch(
        "SELECT id FROM kit_items WHERE queue = $1 ORDER BY id LIMIT $2", queue, BATCH
    )
    return [r["id"] for r in rows]


@bl.work_query
async def take(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    ids = await _ids(conn, name)
    return bl.Work(ids) if ids else bl.Idle(cooldown=0.0)


@bl.work_query
async def take_then_wait(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    """Idle with a timeout: the name goes ``waiting`` (and keeps its owner) once done."""
    ids = await _ids(conn, name)
    return bl.Work(ids) if ids else bl.Idle(cooldown=0.0, timeout=120.0)


@bl.work_query
async def always(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    """Never idle."""
    return bl.Work([0])


@bl.worker
async def move(conn: Any, batch: list[int]) -> bl.Debounce | None:
    if _psycopg(conn):
        cur = await conn.execute(
            "DELETE FROM kit_items WHERE id = ANY(%s) RETURNING queue", (batch,)
        )
        queue = (await cur.fetchone())[0]
        await conn.execute(
            "INSERT INTO kit_done (id, queue) SELECT unnest(%s::bigint[]), %s", (batch, queue)
        )
    else:
        queue = await conn.fetchval(
            "DELETE FROM kit_items WHERE id = ANY($1) RETURNING queue", batch
        )
        await conn.execute(
            "INSERT INTO kit_done (id, queue) SELECT unnest($1::bigint[]), $2", batch, queue
        )
    on_outcome(lambda committed: OUTCOMES.append((batch, committed)))
    CALLS[queue] = CALLS.get(queue, 0) + 1
    if FAIL_AT.get(queue) == CALLS[queue]:
        raise RuntimeError(f"injected failure in batch {CALLS[queue]} of {queue}")
    if queue in SWALLOW:
        # The mistake under test: the error is caught, the transaction is aborted.
        with contextlib.suppress(Exception):
            await conn.execute("SELECT 1/0")
    return bl.Debounce(30.0) if queue in DEBOUNCE else None


@bl.worker
async def count(conn: Any, batch: list[int]) -> None:
    CALLS["always"] = CALLS.get("always", 0) + 1


def reset() -> None:
    OUTCOMES.clear()
    FAIL_AT.clear()
    SWALLOW.clear()
    DEBOUNCE.clear()
    CALLS.clear()


@bl.worker
async def sleepy(conn: Any, batch: list[int]) -> None:
    """Writes, then outlasts any short ``iteration_timeout`` on the server."""
    if _psycopg(conn):
        await conn.execute("DELETE FROM kit_items WHERE id = ANY(%s)", (batch,))
    else:
        await conn.execute("DELETE FROM kit_items WHERE id = ANY($1)", batch)
    await conn.execute("SELECT pg_sleep(30)")
