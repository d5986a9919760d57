"""The SPEC's invariants, checked on what the test workers recorded in ``done``."""

from __future__ import annotations

from typing import Any


async def violations(conn: Any, expected_items: int) -> dict[str, int]:
    """Counts of each kind of violation (all zero when the run was correct).

    lost: inserted items never processed by a committed batch; duplicated: items processed by
    more than one committed batch; overlapping: pairs of committed batches of one name whose
    [started, finished] intervals overlap; backwards: batches whose generation is lower than the
    previous committed batch of the same name.
    """
    processed = int(await conn.fetchval("SELECT count(DISTINCT item_id) FROM done"))
    rows = int(await conn.fetchval("SELECT count(*) FROM done"))
    overlapping = int(
        await conn.fetchval(
            """
            WITH b AS (SELECT DISTINCT name, generation, pid, started, finished FROM done)
            SELECT count(*) FROM b x JOIN b y
              ON x.name = y.name AND (x.started, x.pid) < (y.started, y.pid)
             AND x.started < y.finished AND y.started < x.finished
            """
        )
    )
    backwards = int(
        await conn.fetchval(
            """
            WITH b AS (SELECT DISTINCT name, generation, started FROM done)
            SELECT count(*) FROM (
                SELECT generation < lag(generation) OVER (PARTITION BY name ORDER BY started)
                       AS back FROM b) t
             WHERE back
            """
        )
    )
    return {
        "lost": expected_items - processed,
        "duplicated": rows - processed,
        "overlapping": overlapping,
        "backwards": backwards,
    }


async def assert_invariants(conn: Any, expected_items: int) -> None:
    """No item lost or processed twice; per name, committed batches never overlap in time and
    their generations never go backwards."""
    found = await violations(conn, expected_items)
    assert await conn.fetchval("SELECT count(*) FROM items") == 0, "items left unprocessed"
    assert found == dict.fromkeys(found, 0), f"invariant violations: {found}"
