"""batchloop quick start: insert work, ping, and let a host drain it.

    BATCHLOOP_DSN=postgresql://user@localhost/mydb python examples/quickstart.py

(DATABASE_URL works too.) It creates the batchloop schema and a table ``events`` if needed,
starts a Host in this process, inserts a few events, each transaction pinging the ``events``
loop, and waits until the worker has processed them all.

This module also works as the host module for ``examples/sync_script.py``:
``cd examples && batchloop run quickstart``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import batchloop as bl

NAME = "events"


@bl.work_query  # registered as "<module>:next_events"; only registered code ever runs
async def next_events(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    rows = await conn.fetch("SELECT id FROM events ORDER BY id LIMIT 100")
    return bl.Work([r["id"] for r in rows]) if rows else bl.Idle()


@bl.worker
async def handle_events(conn: Any, batch: list[int]) -> bl.Debounce | None:
    values = await conn.fetchval("SELECT array_agg(value) FROM events WHERE id = ANY($1)", batch)
    await conn.execute("DELETE FROM events WHERE id = ANY($1)", batch)  # the worker owns cleanup
    print(f"processed a batch of {len(batch)} event(s): {values}")
    return None  # or bl.Debounce(30.0): no run, and pings ignored, for 30 s


CREATE_TABLE = "CREATE TABLE IF NOT EXISTS events (id bigserial PRIMARY KEY, value int NOT NULL)"


async def main(dsn: str) -> None:
    await bl.migrate(dsn)  # idempotent; also `batchloop migrate`
    # No modules=[...]: this script's decorators already registered its callables.
    async with bl.Host(dsn) as host:
        async with host.pool.acquire() as conn:
            await conn.execute(CREATE_TABLE)
        for value in range(1, 6):
            async with host.pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO events (value) VALUES ($1)", value)
                await bl.ping(
                    conn, NAME, next_events, handle_events, config=bl.Config(debounce=0.1)
                )
        async with host.pool.acquire() as conn:
            for _ in range(200):  # up to 10 s
                left = await conn.fetchval("SELECT count(*) FROM events")
                if left == 0:
                    break
                await asyncio.sleep(0.05)
            status = await bl.status(conn, NAME)
        assert status is not None
        print(f"{NAME!r} is {status.state}: {status.batches} batch(es) committed so far")


if __name__ == "__main__":
    dsn = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        sys.exit(
            "usage: BATCHLOOP_DSN=postgresql://user@host/db python examples/quickstart.py\n"
            "(or set DATABASE_URL)"
        )
    asyncio.run(main(dsn))
