"""Callables for tests/test_pool_reset.py: a worker that leaves session state behind and logs
every statement its connection sends from then on."""

from __future__ import annotations

from typing import Any

import batchloop as bl

SENT: list[str] = []


@bl.work_query
async def take(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    rows = await conn.fetch("SELECT id FROM items ORDER BY id LIMIT 10")
    return bl.Work([r["id"] for r in rows]) if rows else bl.Idle(cooldown=0.0)


@bl.worker
async def put(conn: Any, batch: list[int]) -> None:
    if not SENT:
        conn.add_query_logger(lambda record: SENT.append(str(record.query)))
    await conn.execute("SET work_mem = '7MB'")  # session state a callable should not leave
    await conn.execute("LISTEN reset_test")
    await conn.execute("DELETE FROM items WHERE id = ANY($1)", batch)
