"""One loop per name across hosts, no lost wakeups, and takeover when an owner goes away."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

import batchloop as bl

from helpers import count as _count
from helpers import wait_for
from invariants import assert_invariants
from jobs import create_tables, insert_and_ping, knobs, next_items, process_items

pytestmark = pytest.mark.anyio


async def test_two_hosts_never_overlap_on_a_name(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    names = [f"n{i}" for i in range(6)]
    for n in names:
        knobs(n).limit = 5
        knobs(n).sleep = 0.01
    async with (
        bl.Host(migrated_dsn, modules=["jobs"]) as a,
        bl.Host(migrated_dsn, modules=["jobs"]) as b,
    ):
        for _ in range(4):
            for n in names:
                await insert_and_ping(conn, n, 20)
            await asyncio.sleep(0.1)
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0, timeout=30)
        assert not (a.owned() & b.owned())
    await assert_invariants(conn, 6 * 4 * 20)
    await conn.close()


async def test_no_lost_wakeup_while_loop_keeps_going_idle(migrated_dsn: str) -> None:
    """Many producers insert+ping while the loop, with no cooldown, goes idle constantly."""
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    knobs("race").idle = bl.Idle(cooldown=0.0)
    knobs("race").limit = 3
    pool = await asyncpg.create_pool(migrated_dsn, min_size=8, max_size=8)
    per_producer, producers = 60, 8

    async def producer(seed: int) -> None:
        rng = random.Random(seed)
        async with pool.acquire() as c:
            for _ in range(per_producer):
                async with c.transaction():
                    await c.execute("INSERT INTO items (name) VALUES ('race')")
                    if rng.random() < 0.5:
                        await asyncio.sleep(rng.random() * 0.004)  # widen the window
                    await bl.ping(c, "race", next_items, process_items)
                await asyncio.sleep(rng.random() * 0.01)

    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await asyncio.gather(*(producer(i) for i in range(producers)))
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0, timeout=30)
        went_idle = await _count(conn, "SELECT count(*) FROM calls")
    assert went_idle > 10
    await assert_invariants(conn, per_producer * producers)
    await pool.close()
    await conn.close()


async def test_takeover_when_owner_control_connection_is_terminated(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    k = knobs("own")
    k.limit, k.sleep = 1, 0.05
    async with bl.Host(migrated_dsn, modules=["jobs"]) as a:
        await insert_and_ping(conn, "own", 1000)
        await wait_for(lambda: "own" in a.owned())
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await wait_for(
                lambda: _count(conn, "SELECT count(*) FROM done"), expect=lambda n: n >= 3
            )
            # Kill A's control connection (its session locks go with it): A must stop at once
            # and B must take over within about a second.
            killed = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM (SELECT DISTINCT l.pid "
                "FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = $1) t",
                a.application_name,
            )
            assert killed
            t0 = await conn.fetchval("SELECT clock_timestamp()")
            old_gen = await conn.fetchval("SELECT max(generation) FROM done")
            # The next committed batch comes from a new generation (whichever host claimed:
            # B, or A once it reconnected as a fresh session), within about a second.
            first_new = await wait_for(
                lambda: conn.fetchval(
                    "SELECT min(finished) FROM done WHERE generation > $1", old_gen
                ),
                timeout=5,
            )
            assert (first_new - t0).total_seconds() < 1.5
            assert (
                await _count(
                    conn,
                    "SELECT count(*) FROM done WHERE generation <= $1 AND finished > $2",
                    old_gen,
                    t0,
                )
                == 0
            ), "the zombie generation committed after losing its lock"
            k.limit = 100
            k.sleep = 0
            await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0, timeout=30)
    await assert_invariants(conn, 1000)
    await conn.close()


async def test_graceful_exit_hands_names_over_at_once(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    k = knobs("handover")
    k.limit, k.sleep = 1, 0.02
    b = bl.Host(migrated_dsn, modules=["jobs"])
    async with bl.Host(migrated_dsn, modules=["jobs"]) as a:
        await insert_and_ping(conn, "handover", 300)
        await wait_for(lambda: "handover" in a.owned())
        await b.__aenter__()
    try:
        await wait_for(lambda: "handover" in b.owned(), timeout=1.0)
        k.limit, k.sleep = 100, 0
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0, timeout=30)
    finally:
        await b.__aexit__(None, None, None)
    await assert_invariants(conn, 300)
    await conn.close()
