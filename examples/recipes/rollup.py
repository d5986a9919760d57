"""Recipe: a periodic rollup, with ``Idle(timeout=...)`` as the scheduler.

    DATABASE_URL=postgresql://user@localhost/mydb python -m examples.recipes.rollup

Page views are inserted all day without any ping (a hot path should not wake anything). A name
that nobody pings, ``rollup:page-views``, adds them up into per-minute counts every ``every``
seconds:

* ``schedule`` stores the period in ``rollup_state`` and pings the name once (at deploy; doing
  it again only changes the period);
* the work query answers ``Work`` when ``next_at`` has come and otherwise
  ``Idle(timeout=seconds until next_at, cooldown=0)``: the loop is **waiting**, with no
  polling, and its host (or another, if that one dies) wakes it when it is due. With no pings
  there is nothing to cool down for, hence ``cooldown=0``;
* the worker adds the new rows to ``page_view_rollup`` and moves ``next_at`` one period on
  (to a period from now if it fell behind, so a host that was down does not run a burst of
  catch-up passes).

"New rows" are read with the commit-order-safe cursor (:mod:`batchloop.cursor`): a view
inserted by a transaction that commits after the pass that would have counted it is counted by
the next pass instead of never. The counts and the cursor commit together, so every view is
counted exactly once.

A period of at most a second keeps the loop running rather than waiting (``Idle``'s rule);
rollups are usually every minute or more.
"""

from __future__ import annotations

import asyncio
from typing import Any

import batchloop as bl
import batchloop.cursor as blc

from ._common import dsn_from_env, until

NAME = "rollup:page-views"

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS page_views (
    id bigserial PRIMARY KEY,
    {blc.xid_column()},
    page text NOT NULL,
    at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS page_views_xid_id ON page_views (xid, id);
CREATE TABLE IF NOT EXISTS page_view_rollup (
    page text NOT NULL,
    minute timestamptz NOT NULL,
    views bigint NOT NULL,
    PRIMARY KEY (page, minute)
);
CREATE TABLE IF NOT EXISTS rollup_state (
    name text PRIMARY KEY,
    every interval NOT NULL,
    next_at timestamptz NOT NULL DEFAULT now(),
    xid xid8 NOT NULL DEFAULT '0',
    id bigint NOT NULL DEFAULT 0,
    runs int NOT NULL DEFAULT 0,
    last_run_at timestamptz
);
"""

ROLL_UP = f"""
WITH new AS (
    SELECT v.xid, v.id, v.page, v.at FROM page_views v, rollup_state s
    WHERE s.name = $1 AND {blc.settled(table="v")} AND (v.xid, v.id) > (s.xid, s.id)
),
added AS (
    INSERT INTO page_view_rollup (page, minute, views)
    SELECT page, date_trunc('minute', at), count(*) FROM new GROUP BY 1, 2
    ON CONFLICT (page, minute) DO UPDATE SET views = page_view_rollup.views + excluded.views
)
SELECT count(*) AS rows, max(xid) AS xid, max(id) FILTER (WHERE xid = (SELECT max(xid) FROM new))
    AS id
FROM new
"""


async def create_tables(conn: Any) -> None:
    await conn.execute(SCHEMA)


async def schedule(conn: Any, every: float) -> None:
    """Run the rollup every ``every`` seconds from now on (in the caller's transaction)."""
    await conn.execute(
        "INSERT INTO rollup_state (name, every) VALUES ($1, make_interval(secs => $2)) "
        "ON CONFLICT (name) DO UPDATE SET every = excluded.every",
        NAME,
        every,
    )
    await bl.ping(conn, NAME, rollup_due, roll_up)


@bl.work_query
async def rollup_due(conn: Any, name: str) -> bl.Work[str] | bl.Idle:
    due_in = await conn.fetchval(
        "SELECT extract(epoch FROM next_at - now())::float8 FROM rollup_state WHERE name = $1",
        name,
    )
    if due_in is None:
        return bl.Idle()  # not scheduled
    if due_in > 0:
        return bl.Idle(timeout=due_in, cooldown=0)
    return bl.Work(name)


@bl.worker
async def roll_up(conn: Any, batch: str) -> None:
    done = await conn.fetchrow(ROLL_UP, batch)
    await conn.execute(
        """
        UPDATE rollup_state SET
            xid = coalesce($2::xid8, xid), id = coalesce($3, id), runs = runs + 1,
            last_run_at = now(),
            next_at = CASE WHEN next_at + every > now() THEN next_at + every
                           ELSE now() + every END
        WHERE name = $1
        """,
        batch,
        done["xid"],
        done["id"],
    )


async def main(dsn: str) -> None:
    await bl.migrate(dsn)
    async with bl.Host(dsn) as host, host.pool.acquire() as conn:
        await create_tables(conn)
        async with conn.transaction():
            await schedule(conn, every=2.0)
        await conn.execute(
            "INSERT INTO page_views (page) SELECT (ARRAY['/', '/docs', '/pricing'])[1 + g % 3] "
            "FROM generate_series(1, 300) g"
        )  # no ping: the rollup's schedule picks them up
        # Every view counted: by the second run, or a later one if another session's open
        # transaction held the cursor back (see batchloop.cursor).
        await until(
            conn,
            "SELECT (SELECT coalesce(sum(views), 0) FROM page_view_rollup) = "
            "(SELECT count(*) FROM page_views)",
        )
        status = await bl.status(conn, NAME)
        rows = await conn.fetch("SELECT page, sum(views) AS n FROM page_view_rollup GROUP BY 1")
    print(f"{NAME!r} is {status.state if status else '?'} between runs")
    for r in sorted(rows):
        print(f"{r['page']}: {r['n']} views")


if __name__ == "__main__":
    asyncio.run(main(dsn_from_env("rollup")))
