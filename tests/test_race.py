"""Revision changes against a running loop, and a work query that returns empty batches."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest

import batchloop as bl

from helpers import count, wait_for
from race_jobs import TABLES, WORKERS, count_empty, empty_batches, race_query

pytestmark = pytest.mark.anyio

ALTERNATIONS = 300


async def test_work_pinged_with_new_callables_is_run_by_them(migrated_dsn: str) -> None:
    """Each producer transaction inserts items and pings with the other worker than the last
    one. The loop is running and polling flat out, so its next iteration often meets the ping's
    row lock. Items are processed before the next switch, so every item must be processed by
    the worker its transaction pinged with: no batch may see rows committed with a revision
    change and still run the previous revision's callables."""
    conn = await asyncpg.connect(migrated_dsn)
    await conn.execute(TABLES)
    name = "switch"
    try:
        async with bl.Host(migrated_dsn, modules=["race_jobs"]):
            for i in range(ALTERNATIONS):
                tag = "ab"[i % 2]
                async with conn.transaction():
                    await conn.execute("INSERT INTO race_items (pinged) VALUES ($1)", tag)
                    got = await bl.ping(conn, name, race_query, WORKERS[tag])
                    await conn.execute("INSERT INTO race_items (pinged) VALUES ($1)", tag)
                assert got == ("created" if i == 0 else "updated"), (i, got)
                await wait_for(
                    lambda: count(conn, "SELECT count(*) FROM race_done"),
                    expect=2 * (i + 1),
                    interval=0.002,
                )
            wrong = await conn.fetch(
                "SELECT item_id, pinged, by FROM race_done WHERE pinged <> by ORDER BY item_id"
            )
            assert not wrong, (
                f"{len(wrong)} of {2 * ALTERNATIONS} items were processed by the previous "
                f"revision's worker: {[tuple(r) for r in wrong[:10]]}"
            )
            state = await conn.fetchrow(
                "SELECT w.revision, s.revision AS mirrored FROM batchloop.workers w "
                "JOIN batchloop.worker_state s USING (name) WHERE name = $1",
                name,
            )
            assert state["revision"] == state["mirrored"] == ALTERNATIONS
    finally:
        await conn.close()
