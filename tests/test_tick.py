"""tick: one bounded drain pass without a long-lived host."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import batchloop as bl

from helpers import wait_for
from jobs import create_tables, insert_and_ping, knobs

pytestmark = pytest.mark.anyio


async def test_tick_drains_due_names_and_reports(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    for name, n in (("a", 250), ("b", 3)):
        await insert_and_ping(conn, name, n)
    knobs("bad").fail_times = 100
    await insert_and_ping(conn, "bad", 1)
    report = await bl.tick(migrated_dsn, budget=10)
    assert report.checked == ["a", "b", "bad"]
    assert sorted(report.drained) == ["a", "b"]
    assert [f.name for f in report.failed] == ["bad"]
    assert "injected failure" in report.failed[0].error
    assert report.batches == 3 + 1  # a: 100+100+50, b: 3
    assert await conn.fetchval("SELECT count(*) FROM items WHERE name <> 'bad'") == 0
    for name in ("a", "b"):
        st = await bl.status(conn, name)
        assert st is not None and st.state == "idle" and st.owner is None
    bad = await bl.status(conn, "bad")
    assert bad is not None and bad.consecutive_failures == 1 and bad.state == "running"
    # nothing is due any more except the failing name
    again = await bl.tick(conn, ["a", "b"], budget=5)
    assert again.drained == [] and again.batches == 0 and again.busy == []
    await conn.close()


async def test_tick_leaves_names_a_live_host_owns(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    k = knobs("held")
    k.gate = asyncio.Event()
    async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
        await insert_and_ping(conn, "held", 5)
        await wait_for(lambda: "held" in host.owned())
        await asyncio.wait_for(k.entered.wait(), 10)
        report = await bl.tick(migrated_dsn, ["held"], budget=2)
        assert report.busy == ["held"] and report.batches == 0
        k.gate.set()
    await conn.close()


async def test_tick_stops_at_its_budget(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    k = knobs("big")
    k.limit, k.sleep = 1, 0.05
    await insert_and_ping(conn, "big", 1000)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    report = await bl.tick(migrated_dsn, budget=0.5)
    assert loop.time() - t0 < 2.0
    assert report.drained == [] and 0 < report.batches < 1000
    st = await bl.status(conn, "big")
    assert st is not None and st.state == "running" and st.owner is None
    await conn.close()
