"""Callables for tests/test_outcome.py: a worker that registers commit-outcome callbacks and
records, for each, whether its transaction's rows were visible from another connection."""

from __future__ import annotations

from typing import Any

import batchloop as bl
from batchloop.runtime.outcome import on_outcome

OUTCOMES: list[tuple[list[int], bool]] = []
FAIL = {"times": 0}


@bl.work_query
async def take(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    rows = await conn.fetch("SELECT id FROM items WHERE name = $1 ORDER BY id LIMIT 2", name)
    return bl.Work([r["id"] for r in rows]) if rows else bl.Idle(cooldown=0.0)


@bl.worker
async def put(conn: Any, batch: list[int]) -> None:
    await conn.execute("DELETE FROM items WHERE id = ANY($1)", batch)
    on_outcome(lambda committed: OUTCOMES.append((batch, committed)))
    if FAIL["times"] > 0:
        FAIL["times"] -= 1
        raise RuntimeError("injected failure")
