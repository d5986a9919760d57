"""A quick throughput check of batchloop.jobs (not a test; the benchmarks are in bench/):
``python tests/jobs_tput.py DSN [JOBS] [CONCURRENCY]``.

Dispatches JOBS no-op jobs (default 30,000) with ``dispatch_many``, then starts one Host and
times how long until every job is completed (the host's start included). The database is
migrated, and its jobs table emptied first: use a scratch database.
"""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg

import batchloop as bl
import batchloop.jobs as jobs

CONCURRENCY = int(sys.argv[3]) if len(sys.argv) > 3 else 100


@jobs.job("tput.noop", queue="tput", concurrency=CONCURRENCY)
async def noop(ctx: jobs.JobContext, payload: int) -> None:
    return None


async def main(dsn: str, n: int) -> None:
    await bl.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM batchloop.jobs")
        async with conn.transaction():
            for i in range(0, n, 5000):
                await noop.dispatch_many(conn, list(range(i, min(n, i + 5000))))
        started = time.perf_counter()
        async with bl.Host(dsn):  # the job type is registered in this process already
            query = "SELECT count(*) FROM batchloop.jobs WHERE status <> 'completed'"
            while await conn.fetchval(query):  # noqa: ASYNC110 - polling the database
                await asyncio.sleep(0.02)
            took = time.perf_counter() - started
    finally:
        await conn.close()
    print(f"{n} no-op jobs in {took:.2f} s: {n / took:,.0f} jobs/s (concurrency {CONCURRENCY})")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 30_000))
