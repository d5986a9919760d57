"""Recipe: one name per tenant, fair by construction.

    DATABASE_URL=postgresql://user@localhost/mydb python -m examples.recipes.tenants

A multi-tenant service puts every tenant's jobs in one table, ``tenant_jobs``. With a single
queue, one tenant that enqueues a hundred thousand jobs makes every other tenant wait behind
them. Here every tenant has its own batchloop name, ``tenant:<id>``, all served by the *same*
work query and worker (a work query gets the name it runs for). Each name is its own loop, so a
small tenant's first batch waits for a claim, not for anyone's backlog: the big tenant's loop
takes one pool connection at a time like every other loop, and the host's pool
(``Host(pool_max_size=...)``) is shared among all the names that have work.

Thousands of names cost nothing while idle (no row is written for an idle name; one monitor
query per host covers them all). The work query returns ``Idle(cooldown=...)`` with a short
cooldown so that a tenant that just drained does not keep polling: with thousands of tenants,
a poll every 0.2 s during the default 2 s cooldown adds up, and a ping wakes the name anyway.

Each batch is recorded in ``tenant_batches`` with a global sequence number, so the test can
show the fairness: a small tenant's first batch comes within a few of the big tenant's batches
after it enqueued, whatever the big tenant's backlog.
"""

from __future__ import annotations

import asyncio
from typing import Any

import batchloop as bl

from ._common import dsn_from_env, until

PREFIX = "tenant:"
BATCH = 10
COOLDOWN = 0.2

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenant_jobs (
    id bigserial PRIMARY KEY,
    tenant text NOT NULL,
    work_ms int NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS tenant_jobs_tenant ON tenant_jobs (tenant, id);
CREATE TABLE IF NOT EXISTS tenant_batches (
    seq bigserial PRIMARY KEY,
    tenant text NOT NULL,
    jobs int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""


def name_of(tenant: str) -> str:
    return PREFIX + tenant


async def create_tables(conn: Any) -> None:
    await conn.execute(SCHEMA)


async def enqueue(conn: Any, tenant: str, jobs: int, *, work_ms: int = 0) -> None:
    """Add ``jobs`` jobs for ``tenant`` and wake its loop, in the caller's transaction.

    One transaction enqueuing for several tenants should ping their names in a sorted order
    (see the README's known limitations)."""
    await conn.execute(
        "INSERT INTO tenant_jobs (tenant, work_ms) SELECT $1, $3 FROM generate_series(1, $2)",
        tenant,
        jobs,
        work_ms,
    )
    await bl.ping(conn, name_of(tenant), next_jobs, run_jobs)


@bl.work_query
async def next_jobs(conn: Any, name: str) -> bl.Work[dict[str, Any]] | bl.Idle:
    tenant = name.removeprefix(PREFIX)
    rows = await conn.fetch(
        "SELECT id, work_ms FROM tenant_jobs WHERE tenant = $1 ORDER BY id LIMIT $2",
        tenant,
        BATCH,
    )
    if not rows:
        return bl.Idle(cooldown=COOLDOWN)
    work_ms = sum(r["work_ms"] for r in rows)
    return bl.Work({"tenant": tenant, "ids": [r["id"] for r in rows], "work_ms": work_ms})


@bl.worker
async def run_jobs(conn: Any, batch: dict[str, Any]) -> None:
    if batch["work_ms"]:
        await asyncio.sleep(batch["work_ms"] / 1000)  # stands in for the jobs' real work
    await conn.execute("DELETE FROM tenant_jobs WHERE id = ANY($1)", batch["ids"])
    await conn.execute(
        "INSERT INTO tenant_batches (tenant, jobs) VALUES ($1, $2)",
        batch["tenant"],
        len(batch["ids"]),
    )


async def main(dsn: str) -> None:
    await bl.migrate(dsn)
    async with bl.Host(dsn) as host, host.pool.acquire() as conn:
        await create_tables(conn)
        async with conn.transaction():
            await enqueue(conn, "big", 2000, work_ms=2)  # 200 batches of 20 ms
        await until(conn, "SELECT count(*) FROM tenant_batches")
        async with conn.transaction():
            before = await conn.fetchval("SELECT max(seq) FROM tenant_batches")
            await enqueue(conn, "small", 3)
        await until(conn, "SELECT count(*) FROM tenant_batches WHERE tenant = 'small'")
        between = await conn.fetchval(
            "SELECT count(*) FROM tenant_batches WHERE tenant = 'big' AND seq > $1 AND "
            "seq < (SELECT min(seq) FROM tenant_batches WHERE tenant = 'small')",
            before,
        )
        left = await conn.fetchval("SELECT count(*) FROM tenant_jobs WHERE tenant = 'big'")
    print(
        f"tenant 'small' got its first batch after {between} batch(es) of tenant 'big', "
        f"which still had {left} jobs waiting"
    )


if __name__ == "__main__":
    asyncio.run(main(dsn_from_env("tenants")))
