"""Callables for tests/test_cli_ops.py's ``batchloop run`` processes: each name's batch holds a
pool connection in ``pg_sleep`` (the test's observers see it in pg_stat_activity) until the
process stops, so how many run at once and what SIGTERM does to them can be watched."""

from __future__ import annotations

from typing import Any

import batchloop as bl

TABLES = "CREATE TABLE ops_items (name text PRIMARY KEY)"


@bl.work_query
async def pending(conn: Any, name: str) -> bl.Work[str] | bl.Idle:
    found = await conn.fetchval("SELECT count(*) FROM ops_items WHERE name = $1", name)
    return bl.Work(name) if found else bl.Idle()


@bl.worker
async def hold(conn: Any, name: str) -> None:
    # The DELETE is rolled back if the batch is cut off, so the row says whether it committed.
    await conn.execute("DELETE FROM ops_items WHERE name = $1", name)
    await conn.execute("SELECT pg_sleep(600) /* ops_jobs.hold */")
