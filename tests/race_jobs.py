"""Registered callables for the revision-race and empty-batch tests (``test_race.py``).

``race_items`` holds work tagged with the worker its producer pinged with (``pinged``);
``race_done`` records which worker processed each item.
"""

from __future__ import annotations

from typing import Any

import batchloop as bl

TABLES = """
CREATE TABLE race_items (id bigserial PRIMARY KEY, pinged text NOT NULL);
CREATE TABLE race_done (item_id bigint PRIMARY KEY, pinged text NOT NULL, by text NOT NULL);
"""

IDLE = bl.Idle(cooldown=600.0, poll_interval=0.001)
"""Stay running and poll as fast as the loop can: every poll is a book_batch that may meet a
ping's row lock, which is the race the test looks for."""


@bl.work_query
async def race_query(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    rows = await conn.fetch("SELECT id FROM race_items ORDER BY id LIMIT 100")
    return bl.Work([r["id"] for r in rows]) if rows else IDLE


async def _record(conn: Any, batch: list[int], by: str) -> None:
    await conn.execute(
        "INSERT INTO race_done (item_id, pinged, by) "
        "SELECT id, pinged, $2 FROM race_items WHERE id = ANY($1)",
        batch,
        by,
    )
    await conn.execute("DELETE FROM race_items WHERE id = ANY($1)", batch)


@bl.worker
async def race_worker_a(conn: Any, batch: list[int]) -> None:
    await _record(conn, batch, "a")


@bl.worker
async def race_worker_b(conn: Any, batch: list[int]) -> None:
    await _record(conn, batch, "b")


WORKERS = {"a": race_worker_a, "b": race_worker_b}


@bl.work_query
async def empty_batches(conn: Any, name: str) -> bl.Work[list[int]]:
    """Wrong on purpose: an empty batch instead of Idle(), so the loop spins."""
    return bl.Work([])


@bl.worker
async def count_empty(conn: Any, batch: list[int]) -> None:
    assert batch == []
