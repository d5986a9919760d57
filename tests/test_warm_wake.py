"""Warm wake-ups (protocol.py, "Warm wake-ups"): a ping on a loop that is cooling down reaches
its owner at once ('c' NOTIFY) instead of at the next poll; a ping on a draining loop still
sends nothing; and pings racing a loop that goes idle, or that is taken over, strand nothing."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

import batchloop as bl
from batchloop.runtime.wakeups import Wakeup, decode

from helpers import wait_for
from jobs import create_tables, insert_and_ping, knobs, next_items, process_items

pytestmark = pytest.mark.anyio

CHANNEL = "batchloop:batchloop"


def test_the_cooling_payload_decodes() -> None:
    assert decode("c::orders") == Wakeup("c", "orders")
    assert decode("c::a:b") == Wakeup("c", "a:b")


async def _cooling(conn: asyncpg.Connection, name: str) -> bool:
    return bool(
        await conn.fetchval("SELECT cooling FROM batchloop.worker_state WHERE name = $1", name)
    )


async def _listen(conn: asyncpg.Connection) -> asyncio.Queue[str]:
    got: asyncio.Queue[str] = asyncio.Queue()
    await conn.add_listener(CHANNEL, lambda *args: got.put_nowait(args[3]))
    return got


async def _until_marker(got: asyncio.Queue[str], conn: asyncpg.Connection) -> list[str]:
    """Every notification that committed before a marker we send now (NOTIFYs arrive in
    commit order), so the absence of one is observed, not waited for."""
    await conn.execute("SELECT pg_notify($1, 'marker')", CHANNEL)
    seen: list[str] = []
    while (payload := await asyncio.wait_for(got.get(), 10)) != "marker":
        seen.append(payload)
    return seen


async def test_a_ping_on_a_cooling_loop_runs_it_before_its_next_poll(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    listener = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        # Polls every 60 s for an hour: only a warm wake-up can run the second row in time.
        knobs("warm").idle = bl.Idle(cooldown=3600.0, poll_interval=60.0)
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await insert_and_ping(conn, "warm", 1)
            await wait_for(lambda: _cooling(conn, "warm"), message="the loop never cooled")
            got = await _listen(listener)
            for round_ in range(3):
                assert await insert_and_ping(conn, "warm", 1) == "unchanged"
                await wait_for(
                    lambda: conn.fetchval("SELECT count(*) = 0 FROM items"),
                    timeout=10.0,
                    message=f"round {round_}: the row waited for the next poll",
                )
                await wait_for(lambda: _cooling(conn, "warm"))
            assert (await _until_marker(got, conn)).count("c::warm") == 3
            st = await bl.status(conn, "warm")
            assert st is not None and st.state == "running" and st.batches == 4
    finally:
        await listener.close()
        await conn.close()


async def test_a_ping_on_a_draining_loop_sends_nothing(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    listener = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        k = knobs("busy")
        k.limit, k.gate = 1, asyncio.Event()
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await insert_and_ping(conn, "busy", 3)
            await asyncio.wait_for(k.entered.wait(), 10)  # mid-batch, holding it open
            assert not await _cooling(conn, "busy")
            got = await _listen(listener)
            async with conn.transaction():
                await conn.execute("INSERT INTO items (name) VALUES ('busy')")
                assert await bl.ping(conn, "busy", next_items, process_items) == "unchanged"
            async with conn.transaction():  # a ping alone: no xid, so no row and no WAL
                assert await bl.ping(conn, "busy", next_items, process_items) == "unchanged"
                assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
            assert await _until_marker(got, conn) == []
            k.gate.set()
            await wait_for(lambda: conn.fetchval("SELECT count(*) = 0 FROM items"))
    finally:
        await listener.close()
        await conn.close()


async def _drained(conn: asyncpg.Connection, name: str) -> bool:
    left = await conn.fetchval("SELECT count(*) FROM items WHERE name = $1", name)
    return left == 0


@pytest.mark.parametrize("takeover", [False, True])
async def test_pings_racing_cooling_idle_and_takeover_strand_nothing(
    migrated_dsn: str, takeover: bool
) -> None:
    """A loop that cools for a few ms and goes idle, over and over, pinged at random moments
    (and, with ``takeover``, its host leaving half-way so another takes the name): every row
    is processed and the name ends idle, with no owner."""
    name = f"race-{takeover}"
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        knobs(name).idle = bl.Idle(cooldown=0.02, poll_interval=0.004)
        rng = random.Random(7)
        async with bl.Host(migrated_dsn, modules=["jobs"]) as second:
            first = bl.Host(migrated_dsn, modules=["jobs"])
            await first.__aenter__()
            try:
                await insert_and_ping(conn, name, 1)
                await wait_for(lambda: name in first.owned() or name in second.owned())
                for i in range(150):
                    await insert_and_ping(conn, name, rng.randint(1, 3))
                    if rng.random() < 0.5:
                        await asyncio.sleep(rng.random() * 0.03)  # land in cooling or idle
                    if takeover and i == 75:
                        await first.__aexit__(None, None, None)
                        first = None  # type: ignore[assignment]
            finally:
                if first is not None:
                    await first.__aexit__(None, None, None)
            await wait_for(lambda: _drained(conn, name), timeout=20.0, message="rows stranded")
            await wait_for(
                lambda: bl.status(conn, name),
                timeout=20.0,
                expect=lambda st: st is not None and st.state == "idle" and st.owner is None,
            )
        done = await conn.fetchval("SELECT count(DISTINCT item_id) FROM done WHERE name = $1", name)
        inserted = await conn.fetchval("SELECT last_value FROM items_id_seq")
        assert done == inserted
    finally:
        await conn.close()
