"""Registered callables for the poll-bound test (``test_poll_bound.py``): a work query that
never finds work and holds each poll open a little, counting how many run at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import batchloop as bl

CALLS: Counter[str] = Counter()
"""Queries run, by name."""
RUNNING = 0
"""Polls in flight now (each name's first query, which is not a poll, is not counted)."""
PEAK = 0
"""The most polls that were ever in flight at once."""
HOLD = 0.02
"""Seconds each poll stays open: long enough that polls free to overlap do."""


@bl.work_query
async def empty_query(conn: Any, name: str) -> bl.Idle:
    global RUNNING, PEAK
    await conn.fetchval("SELECT 1")
    CALLS[name] += 1
    if CALLS[name] == 1:
        return bl.Idle(cooldown=3600.0, poll_interval=0.005)
    RUNNING += 1
    PEAK = max(PEAK, RUNNING)
    try:
        await asyncio.sleep(HOLD)  # holds the poll's connection, as a slow query would
    finally:
        RUNNING -= 1
    return bl.Idle(cooldown=3600.0, poll_interval=0.005)


@bl.worker
async def never_worker(conn: Any, batch: list[int]) -> None:
    raise AssertionError("empty_query never returns work")
