"""What a ping costs through SQLAlchemy, against the bare drivers: the median latency of one
transaction that inserts a row and pings (a running worker, so the ping writes nothing).

    python bench/integrations_ping.py --dsn postgresql://user@127.0.0.1/db [--n 300]

The database must be migrated (``batchloop migrate``); the script creates and drops its table.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

import batchloop as bl


@bl.work_query
async def nothing(conn: Any, name: str) -> bl.Idle:
    return bl.Idle()


@bl.worker
async def noop(conn: Any, batch: Any) -> None:
    return None


NAME = "bench-integrations"


async def _timed(n: int, one: Callable[[], Awaitable[None]]) -> float:
    for _ in range(min(20, n)):  # warm up: connections, prepared statements
        await one()
    times = []
    for _ in range(n):
        started = time.perf_counter()
        await one()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def main(dsn: str, n: int) -> None:
    setup = await asyncpg.connect(dsn)
    await setup.execute("CREATE TABLE IF NOT EXISTS bench_items (id bigserial, v int)")
    await bl.ping(setup, NAME, nothing, noop)
    results: dict[str, float] = {}

    raw = await asyncpg.connect(dsn)

    async def asyncpg_bare() -> None:
        async with raw.transaction():
            await raw.execute("INSERT INTO bench_items (v) VALUES (1)")
            await bl.ping(raw, NAME, nothing, noop)

    results["asyncpg Connection"] = await _timed(n, asyncpg_bare)
    await raw.close()

    pg = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

    async def psycopg_bare() -> None:
        async with pg.transaction():
            await pg.execute("INSERT INTO bench_items (v) VALUES (1)")
            await bl.ping(pg, NAME, nothing, noop)

    results["psycopg AsyncConnection"] = await _timed(n, psycopg_bare)
    await pg.close()

    for driver in ("asyncpg", "psycopg"):
        engine = create_async_engine(dsn.replace("postgresql://", f"postgresql+{driver}://", 1))

        async def session_ping(engine: Any = engine) -> None:
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(text("INSERT INTO bench_items (v) VALUES (1)"))
                await bl.ping(session, NAME, nothing, noop)

        async def session_only(engine: Any = engine) -> None:
            async with AsyncSession(engine) as session, session.begin():
                await session.execute(text("INSERT INTO bench_items (v) VALUES (1)"))

        results[f"SQLAlchemy AsyncSession ({driver})"] = await _timed(n, session_ping)
        results[f"  the same without the ping ({driver})"] = await _timed(n, session_only)
        await engine.dispose()

    await setup.execute("DROP TABLE bench_items")
    await setup.close()
    for label, ms in results.items():
        print(f"{label:42s} {ms:7.3f} ms (median of {n})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    # No host runs these on purpose (a worker that stays running: its pings write nothing), so
    # the warning that a __main__ worker has no host is expected here.
    logging.getLogger("batchloop").setLevel(logging.ERROR)
    asyncio.run(main(args.dsn, args.n))
