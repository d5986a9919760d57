"""Registered callables shared by the integration tests.

They work on the test database's own tables (created by ``create_tables``): ``items`` holds
work, ``done`` records every committed processing of an item with the loop's generation and
database timestamps. Per-name knobs (batch size, idle result, injected failures, a gate to
hold a batch open) live in ``KNOBS``, which only this process reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any

import asyncpg

import batchloop as bl

TABLES = """
CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, value int NOT NULL DEFAULT 0);
CREATE INDEX ON items (name, id);
CREATE TABLE done (
    item_id bigint NOT NULL, name text NOT NULL, generation bigint NOT NULL, pid int NOT NULL,
    started timestamptz NOT NULL, finished timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE calls (
    name text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp(),
    tx bigint NOT NULL DEFAULT txid_current()
);
"""


@dataclass
class Knobs:
    limit: int = 100
    idle: bl.Idle = field(default_factory=lambda: bl.Idle(cooldown=0.3, poll_interval=0.05))
    fail_times: int = 0
    """Raise in the worker this many times (after writing, so rollback is observable)."""
    gate: asyncio.Event | None = None
    """If set, the worker waits for it mid-batch (holding the iteration open)."""
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    debounce: float | None = None
    sleep: float = 0.0
    idle_gate: asyncio.Event | None = None
    """If set, the work query, having found nothing, waits for it before returning Idle."""
    idle_entered: asyncio.Event = field(default_factory=asyncio.Event)
    swallow_errors: int = 0
    """Run a failing statement and catch its error (no savepoint) this many times."""
    commit_itself: int = 0
    """COMMIT the loop's transaction from inside the worker this many times."""
    rollback_itself: int = 0
    """ROLLBACK the loop's transaction from inside the worker this many times."""
    pids: list[int] = field(default_factory=list)
    """The server pid of each batch's connection."""
    drop_prepared: int = 0
    """DEALLOCATE batchloop's prepared book_batch from inside the worker this many times."""
    prepared_seen: list[int] = field(default_factory=list)
    """How many of batchloop's prepared statements each batch's session held."""
    server_sleep: float = 0.0
    """Seconds of ``pg_sleep`` in the worker, once (to be cut off by ``iteration_timeout``)."""


KNOBS: dict[str, Knobs] = {}


def knobs(name: str) -> Knobs:
    return KNOBS.setdefault(name, Knobs())


async def create_tables(conn: Any) -> None:
    await conn.execute(TABLES)


@bl.work_query
async def next_items(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    await conn.execute("INSERT INTO calls (name) VALUES ($1)", name)
    k = knobs(name)
    rows = await conn.fetch(
        "SELECT id FROM items WHERE name = $1 ORDER BY id LIMIT $2", name, k.limit
    )
    if not rows:
        if k.idle_gate is not None:
            k.idle_entered.set()
            await k.idle_gate.wait()
        return k.idle
    return bl.Work([r["id"] for r in rows])


@bl.worker
async def process_items(conn: Any, batch: list[int]) -> bl.Debounce | None:
    name = await conn.fetchval("SELECT name FROM items WHERE id = $1", batch[0])
    k = knobs(name)
    # before the writes: fault tests find a batch mid-way by its last statement, the DELETE
    ours = await conn.fetch(
        "SELECT name FROM pg_prepared_statements WHERE name LIKE 'batchloop_book_%'"
    )
    k.prepared_seen.append(len(ours))
    if k.drop_prepared > 0 and ours:
        k.drop_prepared -= 1
        await conn.execute(f"DEALLOCATE {ours[0]['name']}")
    started = await conn.fetchval("SELECT clock_timestamp()")
    gen, pid = await conn.fetchrow(
        "SELECT generation, pg_backend_pid() FROM batchloop.worker_state WHERE name = $1", name
    )
    k.pids.append(pid)
    await conn.execute(
        "INSERT INTO done (item_id, name, generation, pid, started) "
        "SELECT unnest($1::bigint[]), $2, $3, $4, $5",
        batch,
        name,
        gen,
        pid,
        started,
    )
    await conn.execute("DELETE FROM items WHERE id = ANY($1)", batch)
    k.entered.set()
    if k.server_sleep:
        seconds, k.server_sleep = k.server_sleep, 0.0
        await conn.execute("SELECT pg_sleep($1)", seconds)
    if k.gate is not None:
        await k.gate.wait()
    if k.sleep:
        await asyncio.sleep(k.sleep)
    if k.fail_times > 0:
        k.fail_times -= 1
        raise RuntimeError(f"injected failure for {name}")
    if k.swallow_errors > 0:
        k.swallow_errors -= 1
        with contextlib.suppress(asyncpg.DivisionByZeroError):  # wrong: aborts the transaction
            await conn.execute("SELECT 1 / 0")
    if k.commit_itself > 0:
        k.commit_itself -= 1
        await conn.execute("COMMIT")
    if k.rollback_itself > 0:
        k.rollback_itself -= 1
        await conn.execute("ROLLBACK")
    return bl.Debounce(k.debounce) if k.debounce is not None else None


@bl.worker
async def typed_worker(conn: Any, batch: list[int]) -> None:
    await conn.execute("DELETE FROM items WHERE id = ANY($1)", batch)


@bl.work_query
async def bad_batch_query(conn: Any, name: str) -> bl.Work[Any] | bl.Idle:
    return bl.Work(["not", "ints"])


async def insert_and_ping(
    conn: Any, name: str, count: int = 1, *, config: bl.Config | None = None
) -> str:
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO items (name, value) SELECT $1, g FROM generate_series(1, $2) g",
            name,
            count,
        )
        return await bl.ping(conn, name, next_items, process_items, config=config)


def undecorated(conn: Any, name: str) -> None:
    """Not registered: ping must refuse it."""


@bl.worker
async def savepoint_worker(conn: Any, batch: list[int]) -> None:
    """Uses a nested transaction (a savepoint inside the loop's transaction) and rolls it back."""
    await conn.execute("DELETE FROM items WHERE id = ANY($1)", batch)
    try:
        async with conn.transaction():
            await conn.execute("INSERT INTO calls (name) VALUES ('inside-savepoint')")
            raise LookupError("undo just the savepoint")
    except LookupError:
        pass
