"""Registered callables for hosts with ``driver="psycopg"``: the same work as ``jobs``, written
for psycopg ``AsyncConnection`` (``%s`` parameters), plus ways to misuse the transaction."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import psycopg

import batchloop as bl


@dataclass
class Knobs:
    limit: int = 100
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    pids: list[int] = field(default_factory=list)
    conn_types: set[type] = field(default_factory=set)
    swallow_errors: int = 0
    """Run a failing statement and catch its error (no savepoint) this many times."""
    commit_itself: int = 0
    """COMMIT the loop's transaction from inside the worker this many times."""
    rollback_itself: int = 0
    """ROLLBACK the loop's transaction from inside the worker this many times."""
    drop_prepared: int = 0
    """DEALLOCATE batchloop's prepared book_batch from inside the worker this many times."""
    prepared_seen: list[int] = field(default_factory=list)
    """How many of batchloop's prepared statements each batch's session held."""
    server_sleep: float = 0.0
    """Seconds of ``pg_sleep`` in the worker, once (to be cut off by ``iteration_timeout``)."""


KNOBS: dict[str, Knobs] = {}


def knobs(name: str) -> Knobs:
    return KNOBS.setdefault(name, Knobs())


@bl.work_query
async def next_items(conn: psycopg.AsyncConnection[Any], name: str) -> bl.Work[list[int]] | bl.Idle:
    cur = await conn.execute(
        "SELECT id FROM items WHERE name = %s ORDER BY id LIMIT %s", (name, knobs(name).limit)
    )
    rows = await cur.fetchall()
    if not rows:
        return bl.Idle(cooldown=0.2, poll_interval=0.05)
    return bl.Work([r[0] for r in rows])


@bl.worker
async def process_items(conn: psycopg.AsyncConnection[Any], batch: list[int]) -> None:
    cur = await conn.execute(
        "SELECT i.name, s.generation, pg_backend_pid() FROM items i "
        "JOIN batchloop.worker_state s USING (name) WHERE i.id = %s",
        (batch[0],),
    )
    row = await cur.fetchone()
    assert row is not None
    name, generation, pid = row
    k = knobs(name)
    k.conn_types.add(type(conn))
    k.pids.append(pid)
    cur = await conn.execute(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'batchloop_book_%'"
    )
    ours = [r[0] for r in await cur.fetchall()]
    k.prepared_seen.append(len(ours))
    if k.drop_prepared > 0 and ours:
        k.drop_prepared -= 1
        await conn.execute(f"DEALLOCATE {ours[0]}".encode())
    await conn.execute(
        "INSERT INTO done (item_id, name, generation, pid, started) "
        "SELECT unnest(%s::bigint[]), %s, %s, %s, clock_timestamp()",
        (batch, name, generation, pid),
    )
    await conn.execute("DELETE FROM items WHERE id = ANY(%s)", (batch,))
    try:  # a nested transaction is a savepoint inside the loop's transaction
        async with conn.transaction():
            await conn.execute("INSERT INTO calls (name) VALUES ('inside-savepoint')")
            raise LookupError("undo just the savepoint")
    except LookupError:
        pass
    k.entered.set()
    if k.server_sleep:
        seconds, k.server_sleep = k.server_sleep, 0.0
        await conn.execute("SELECT pg_sleep(%s)", (seconds,))
    if k.gate is not None:
        await k.gate.wait()
    if k.swallow_errors > 0:
        k.swallow_errors -= 1
        with contextlib.suppress(psycopg.errors.DivisionByZero):  # wrong: aborts the transaction
            await conn.execute("SELECT 1 / 0")
    if k.commit_itself > 0:
        k.commit_itself -= 1
        await conn.execute("COMMIT")
    if k.rollback_itself > 0:
        k.rollback_itself -= 1
        await conn.execute("ROLLBACK")


async def insert_and_ping(
    conn: psycopg.AsyncConnection[Any], name: str, count: int, *, config: bl.Config | None = None
) -> str:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO items (name, value) SELECT %s, g FROM generate_series(1, %s) g",
            (name, count),
        )
        return await bl.ping(conn, name, next_items, process_items, config=config)
