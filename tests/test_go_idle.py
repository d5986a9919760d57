"""Going idle (protocol.py, "No lost wakeup"): a poll past the cooldown takes the wake lock with
its booking (``book_batch`` with the lock switched on), so its one query is the go-idle
confirmation; when a ping holds the lock, the loop books without it, keeps polling, and nothing
is stranded."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import batchloop as bl

from helpers import wait_for
from jobs import create_tables, insert_and_ping, knobs, next_items, process_items

pytestmark = pytest.mark.anyio


async def _status(conn: asyncpg.Connection, name: str) -> str:
    return str(await conn.fetchval("SELECT status FROM batchloop.workers WHERE name = $1", name))


async def _queries_per_transaction(conn: asyncpg.Connection, name: str) -> list[int]:
    """How many work queries each committed iteration ran, oldest first (``calls`` records
    each query with its transaction id)."""
    rows = await conn.fetch(
        "SELECT count(*) AS n FROM calls WHERE name = $1 GROUP BY tx ORDER BY min(at)", name
    )
    return [r["n"] for r in rows]


async def test_a_poll_past_the_cooldown_goes_idle_with_one_query(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        knobs("quiet").idle = bl.Idle(cooldown=0.3, poll_interval=0.05)
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await insert_and_ping(conn, "quiet", 1)
            await wait_for(lambda: _status(conn, "quiet"), 20, expect="idle")
            per_tx = await _queries_per_transaction(conn, "quiet")
        # the batch, polls within the cooldown, and the poll that went idle: one query each
        assert len(per_tx) >= 3 and per_tx == [1] * len(per_tx)
    finally:
        await conn.close()


async def test_right_after_a_batch_going_idle_confirms_with_a_second_query(
    migrated_dsn: str,
) -> None:
    """No poll came before (cooldown 0): the loop cannot know it will go idle, so it queries,
    takes the wake lock, and queries again."""
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        knobs("eager").idle = bl.Idle(cooldown=0)
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await insert_and_ping(conn, "eager", 1)
            await wait_for(lambda: _status(conn, "eager"), 20, expect="idle")
            assert await _queries_per_transaction(conn, "eager") == [1, 2]
    finally:
        await conn.close()


async def test_a_ping_holding_the_wake_lock_keeps_the_loop_polling(migrated_dsn: str) -> None:
    """A ping's open transaction holds the wake lock shared: the booking matches nothing, the
    loop books without the lock, cannot go idle, and polls on; the ping's work is run once the
    ping commits."""
    conn = await asyncpg.connect(migrated_dsn)
    producer = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        knobs("held").idle = bl.Idle(cooldown=0.2, poll_interval=0.05)
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await insert_and_ping(conn, "held", 1)
            await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), 20, expect=1)
            tr = producer.transaction()
            await tr.start()
            try:
                await producer.execute("INSERT INTO items (name) VALUES ('held')")
                assert await bl.ping(producer, "held", next_items, process_items) in (
                    "unchanged",
                    "woken",
                )
                # Past the cooldown, polls keep coming and each fails to take the lock.
                before = await conn.fetchval("SELECT count(*) FROM calls WHERE name = 'held'")
                await wait_for(
                    lambda: conn.fetchval("SELECT count(*) FROM calls WHERE name = 'held'"),
                    20,
                    expect=lambda n: n >= before + 8,
                )
                assert await _status(conn, "held") == "running"
            finally:
                await tr.commit()
            await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), 20, expect=2)
            await wait_for(lambda: _status(conn, "held"), 20, expect="idle")
        assert await conn.fetchval("SELECT count(*) FROM items") == 0
    finally:
        await producer.close()
        await conn.close()


async def test_pings_racing_polls_past_the_cooldown_strand_nothing(migrated_dsn: str) -> None:
    """Many producers ping while the loop keeps reaching the end of a short cooldown: every
    item is processed and the worker ends idle."""
    conn = await asyncpg.connect(migrated_dsn)
    producers = [await asyncpg.connect(migrated_dsn) for _ in range(4)]
    try:
        await create_tables(conn)
        knobs("race").idle = bl.Idle(cooldown=0.01, poll_interval=0.005)
        async with bl.Host(migrated_dsn, modules=["jobs"]):

            async def produce(p: asyncpg.Connection) -> None:
                for _ in range(40):
                    await insert_and_ping(p, "race", 1)
                    await asyncio.sleep(0.003)  # spread the pings over many go-idle attempts

            await asyncio.gather(*(produce(p) for p in producers))
            await wait_for(lambda: conn.fetchval("SELECT count(*) FROM items"), 30, expect=0)
            await wait_for(lambda: _status(conn, "race"), 20, expect="idle")
        assert await conn.fetchval("SELECT count(DISTINCT item_id) FROM done") == 160
        assert await conn.fetchval("SELECT count(*) FROM done") == 160
    finally:
        for p in producers:
            await p.close()
        await conn.close()
