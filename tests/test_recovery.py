"""Regressions: sessions that fail, server defaults that differ, claims that must not block."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import batchloop as bl
from batchloop.drivers.asyncpg import AsyncpgLoopDriver
from batchloop.models import Config
from batchloop.registry import lookup
from batchloop.runtime.iteration import LoadedWorker
from batchloop.runtime.loop import LoopContext, NameLoop

from helpers import count as _count
from helpers import wait_for
from jobs import create_tables, insert_and_ping, knobs, next_items, process_items

pytestmark = pytest.mark.anyio


async def test_host_recovers_when_declared_dead_while_busy(migrated_dsn: str) -> None:
    """Its heartbeat finds its row gone: it must drop the session and come back, not livelock."""
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    k = knobs("busy")
    k.limit, k.sleep = 1, 0.01
    async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
        await insert_and_ping(conn, "busy", 400)
        await wait_for(lambda: "busy" in host.owned())
        await conn.execute("DELETE FROM batchloop.hosts")
        # the host notices within a heartbeat, resets, re-registers and drains the rest
        await wait_for(
            lambda: _count(
                conn, "SELECT count(*) FROM batchloop.hosts WHERE host_id = $1", host.host_id
            ),
            expect=1,
        )
        k.limit, k.sleep = 100, 0
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0, timeout=20)
        gens = await _count(conn, "SELECT generation FROM batchloop.worker_state")
        assert gens < 10, f"claim churn: generation reached {gens}"
    await conn.close()


async def test_no_lost_wakeup_when_server_default_is_repeatable_read(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    dbname = await conn.fetchval("SELECT current_database()")
    await conn.execute(
        f"ALTER DATABASE \"{dbname}\" SET default_transaction_isolation = 'repeatable read'"
    )
    await conn.close()
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    k = knobs("rrdefault")
    k.idle = bl.Idle(cooldown=0.0)
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        k.idle_gate = asyncio.Event()
        await bl.ping(conn, "rrdefault", next_items, process_items)
        # The loop found nothing and is about to go idle; a producer commits meanwhile.
        await asyncio.wait_for(k.idle_entered.wait(), 10)
        async with conn.transaction(isolation="read_committed"):
            await conn.execute("INSERT INTO items (name) VALUES ('rrdefault')")
            assert await bl.ping(conn, "rrdefault", next_items, process_items) == "unchanged"
        k.idle_gate.set()
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=1)
    await conn.close()


async def test_claim_skips_a_row_a_producer_holds_and_comes_back(migrated_dsn: str) -> None:
    """A due waiting name whose row an open REPEATABLE READ ping holds FOR SHARE: the host
    must neither block (its heartbeat would stall) nor leak the name's lock."""
    conn = await asyncpg.connect(migrated_dsn)
    other = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    await insert_and_ping(conn, "held", 1)
    await conn.execute(
        "UPDATE batchloop.workers SET status = 'waiting' WHERE name = 'held';"
        "UPDATE batchloop.worker_state SET next_run_at = now() - interval '1 s'"
    )
    tr = other.transaction(isolation="repeatable_read")
    await tr.start()
    await other.execute("INSERT INTO items (name) VALUES ('held')")
    assert await bl.ping(other, "held", next_items, process_items) == "unchanged"  # due: leave
    async with bl.Host(migrated_dsn, modules=["jobs"], heartbeat_interval=0.2) as host:
        await asyncio.sleep(1.0)  # several monitor ticks try, and must skip, the locked row
        beat = await conn.fetchval(
            "SELECT now() - heartbeat_at FROM batchloop.hosts WHERE host_id = $1", host.host_id
        )
        assert beat.total_seconds() < 1.0, "the control connection was blocked"
        held_locks = await _count(
            conn,
            "SELECT count(*) FROM pg_locks"
            " WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        assert held_locks == 0, "a skipped claim leaked its session lock"
        await tr.commit()
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0)
        assert await _count(conn, "SELECT count(*) FROM done") == 2
    await other.close()
    await conn.close()


async def test_tick_budget_ending_mid_batch_leaves_the_connection_clean(
    migrated_dsn: str,
) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    k = knobs("long")
    k.limit, k.sleep = 1, 0.4
    await insert_and_ping(conn, "long", 5)
    report = await bl.tick(conn, budget=0.5)
    assert report.batches >= 1 and report.drained == []
    assert not conn.is_in_transaction()
    assert (
        await _count(
            conn,
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        )
        == 0
    )
    k.sleep = 0
    again = await bl.tick(conn, budget=5)
    assert again.drained == ["long"]
    assert await _count(conn, "SELECT count(*) FROM done") == 5
    await conn.close()


async def test_a_returned_connection_leaves_the_zombie_list_and_a_broken_one_stays(
    migrated_dsn: str,
) -> None:
    """A loop cancelled mid-iteration leaves its connection's pid in ``in_flight`` (its backend
    may live on, locks and all, and a host that lost its session ends such backends). Once the
    pool took the connection back and reset it, the pid is no zombie and may serve a user's
    transaction next, so it must leave the list; a broken connection's pid must stay."""
    query, worker = lookup("jobs:next_items", "work_query"), lookup("jobs:process_items", "worker")
    assert query is not None and worker is not None

    async def release(_loop: NameLoop) -> None:
        return None

    pool = await asyncpg.create_pool(migrated_dsn, min_size=1, max_size=2)
    try:
        ctx = LoopContext(pool, "batchloop", release, AsyncpgLoopDriver(), "tester")
        loop = NameLoop(ctx, "n", 1, 1, 2, LoadedWorker(1, query, worker, Config()), 0, 0.0)
        leases = [pool.acquire(), pool.acquire()]
        conns = [await lease.__aenter__() for lease in leases]  # two distinct connections
        pids = [c.get_server_pid() for c in conns]
        assert pids[0] != pids[1]
        for lease, conn, broken in zip(leases, conns, (False, True), strict=True):
            ctx.in_flight[conn.get_server_pid()] = None
            await conn.execute("BEGIN")  # what a cancelled iteration leaves behind
            if broken:
                conn.terminate()  # the client side is gone; the backend may not be
            loop._held = (lease, conn)
            await loop._put_back()
        assert set(ctx.in_flight) == {pids[1]}
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()  # the pool did reset the live one
    finally:
        await pool.close()
