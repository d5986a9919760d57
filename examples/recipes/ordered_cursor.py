"""Recipe: a commit-order-safe cursor (read an append-only table in order, lose nothing).

    DATABASE_URL=postgresql://user@localhost/mydb python -m examples.recipes.ordered_cursor

A feed table is appended to by many producers; consumers read it *in order*, each keeping a
cursor, instead of deleting what they process (several consumers, replay, audit). PostgreSQL
has no commit timestamp, and a ``bigserial`` cursor silently skips rows that commit out of
order: a long transaction inserts id 1, a short one inserts id 2 and commits, the consumer
passes 2 and moves its cursor there, then id 1 commits behind it and is never read.

The safe cursor pages by ``(xid, id)``, where ``xid`` is the inserting transaction's id
(filled by the column's default), and passes only rows that :func:`batchloop.cursor.settled`
lets through: those older than every transaction still in flight. The consumer's cursor and
its output commit in the batch's transaction, so each row is consumed exactly once.

``next_events_naive`` is the broken ``bigserial`` cursor, kept for the comparison in
tests/test_recipes.py; do not copy it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import batchloop as bl
import batchloop.cursor as blc

from ._common import dsn_from_env

log = logging.getLogger(__name__)

SAFE, NAIVE = "feed:safe", "feed:naive"
"""One name per consumer: each keeps its own cursor."""
BATCH = 100
RECHECK = 0.2
"""Seconds before looking again when rows are committed but an older transaction holds them
back: that transaction may never ping, so the loop must not go idle meanwhile."""

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS feed_events (
    id bigserial PRIMARY KEY,
    {blc.xid_column()},
    body text NOT NULL
);
CREATE INDEX IF NOT EXISTS feed_events_xid_id ON feed_events (xid, id);
CREATE TABLE IF NOT EXISTS feed_cursors (
    consumer text PRIMARY KEY,
    xid xid8 NOT NULL DEFAULT '0',
    id bigint NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS feed_consumed (
    consumer text NOT NULL,
    event_id bigint NOT NULL,
    seq bigserial,
    PRIMARY KEY (consumer, event_id)
);
"""

NEXT_SAFE = f"""
SELECT e.xid, e.id FROM feed_events e, feed_cursors c
WHERE c.consumer = $1 AND {blc.settled(table="e")} AND (e.xid, e.id) > (c.xid, c.id)
ORDER BY e.xid, e.id LIMIT $2
"""
HELD_BACK = f"""
SELECT EXISTS (
    SELECT 1 FROM feed_events e, feed_cursors c
    WHERE c.consumer = $1 AND {blc.unsettled(table="e")} AND (e.xid, e.id) > (c.xid, c.id)
)
"""
NEXT_NAIVE = """
SELECT e.xid, e.id FROM feed_events e, feed_cursors c
WHERE c.consumer = $1 AND e.id > c.id ORDER BY e.id LIMIT $2
"""


async def create_tables(conn: Any) -> None:
    """The tables, each consumer's cursor, and its worker (created by a first ping)."""
    await conn.execute(SCHEMA)
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO feed_cursors (consumer) VALUES ($1), ($2) ON CONFLICT DO NOTHING",
            SAFE,
            NAIVE,
        )
        await wake_consumers(conn)


async def append(conn: Any, bodies: list[str]) -> list[int]:
    """Append events in the caller's transaction; returns their ids."""
    rows = await conn.fetch(
        "INSERT INTO feed_events (body) SELECT unnest($1::text[]) RETURNING id", bodies
    )
    return [r["id"] for r in rows]


async def wake_consumers(conn: Any) -> None:
    """Ping both consumers in the caller's transaction.

    Call it last, just before committing: waking an *idle* name locks its rows until the
    transaction ends, so a long transaction that pinged early would hold up other producers'
    pings (a ping of a running name locks nothing).
    """
    for name, query in ((SAFE, next_events), (NAIVE, next_events_naive)):  # a fixed order
        await bl.ping(conn, name, query, consume)


async def publish(conn: Any, bodies: list[str]) -> list[int]:
    """Append events and wake the consumers, in one transaction of its own."""
    async with conn.transaction():
        ids = await append(conn, bodies)
        await wake_consumers(conn)
    return ids


@bl.work_query
async def next_events(conn: Any, name: str) -> bl.Work[dict[str, Any]] | bl.Idle:
    rows = await conn.fetch(NEXT_SAFE, name, BATCH)
    if rows:
        return bl.Work({"consumer": name, "events": [[r["xid"], r["id"]] for r in rows]})
    if await conn.fetchval(HELD_BACK, name):
        return bl.Idle(timeout=RECHECK)
    return bl.Idle()


@bl.work_query
async def next_events_naive(conn: Any, name: str) -> bl.Work[dict[str, Any]] | bl.Idle:
    """WRONG: a ``bigserial`` cursor. Here only to show what it loses."""
    rows = await conn.fetch(NEXT_NAIVE, name, BATCH)
    if rows:
        return bl.Work({"consumer": name, "events": [[r["xid"], r["id"]] for r in rows]})
    return bl.Idle()


@bl.worker
async def consume(conn: Any, batch: dict[str, Any]) -> None:
    consumer, events = batch["consumer"], batch["events"]
    # The work: here, recording what was read, in order; a real consumer would build a
    # projection, forward to another system (idempotently), etc.
    await conn.execute(
        "INSERT INTO feed_consumed (consumer, event_id) SELECT $1, unnest($2::bigint[])",
        consumer,
        [e[1] for e in events],
    )
    last_xid, last_id = events[-1]
    await conn.execute(
        "UPDATE feed_cursors SET xid = $2::xid8, id = $3 WHERE consumer = $1",
        consumer,
        last_xid,
        last_id,
    )


async def consumed(conn: Any, consumer: str) -> list[int]:
    """The event ids ``consumer`` has passed, in the order it passed them."""
    rows = await conn.fetch(
        "SELECT event_id FROM feed_consumed WHERE consumer = $1 ORDER BY seq", consumer
    )
    return [r["event_id"] for r in rows]


async def main(dsn: str) -> None:
    await bl.migrate(dsn)
    async with bl.Host(dsn) as host:
        async with host.pool.acquire() as conn:
            await create_tables(conn)
        # A long transaction inserts first and commits last; a short one commits in between.
        async with host.pool.acquire() as long_conn, host.pool.acquire() as conn:
            long_tx = long_conn.transaction()
            await long_tx.start()
            (first,) = await append(long_conn, ["written first, committed last"])
            (second,) = await publish(conn, ["written second, committed first"])
            await until(conn, NAIVE, second)  # the bigserial cursor moves past `first`
            await wake_consumers(long_conn)
            await long_tx.commit()
            (third,) = await publish(conn, ["written third"])
            await until(conn, NAIVE, third)
            await until(conn, SAFE, third)
            safe, naive = await consumed(conn, SAFE), await consumed(conn, NAIVE)
    print(f"safe cursor passed {safe}; bigserial cursor passed {naive}")
    if first not in naive:
        print(f"the bigserial cursor lost event {first}: it committed after event {second}")


async def until(conn: Any, consumer: str, event_id: int, timeout: float = 30.0) -> None:
    """Wait (polling) until ``consumer`` has passed ``event_id``."""
    for _ in range(int(timeout / 0.05)):
        if event_id in await consumed(conn, consumer):
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{consumer} did not pass event {event_id} within {timeout:g} s")


if __name__ == "__main__":
    asyncio.run(main(dsn_from_env("ordered_cursor")))
