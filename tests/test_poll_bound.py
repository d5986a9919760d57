"""Cooldown polls run at most half a pool at a time (``LoopContext.polls``), so that thousands
of cooling loops leave connections free for loops with work (protocol.py, "Warm wake-ups")."""

from __future__ import annotations

import asyncpg
import pytest

import batchloop as bl

import poll_jobs
from helpers import wait_for

pytestmark = pytest.mark.anyio


async def test_cooling_loops_poll_at_most_half_a_pool_at_once(migrated_dsn: str) -> None:
    names = [f"cool{i}" for i in range(8)]
    poll_jobs.CALLS.clear()
    poll_jobs.PEAK = 0
    conn = await asyncpg.connect(migrated_dsn)
    try:
        async with bl.Host(migrated_dsn, modules=["poll_jobs"], pool_max_size=4):
            for n in names:
                await bl.ping(conn, n, poll_jobs.empty_query, poll_jobs.never_worker)
            await wait_for(
                lambda: all(poll_jobs.CALLS[n] >= 6 for n in names),
                20,
                message="every loop polled a few times",
            )
        # 8 loops polling every 5 ms, each poll open for 20 ms: without the bound they would
        # fill the pool (4); with it, two at a time.
        assert poll_jobs.PEAK == 2, poll_jobs.PEAK
    finally:
        await conn.close()
