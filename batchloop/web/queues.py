"""Job queues counted by status, for the status page (``/api/queues``).

One ``GROUP BY`` over the jobs table, so the page costs the same however many jobs there are
in a status; finished jobs are few anyway (retention deletes them).
"""

from __future__ import annotations

from typing import Any

import pydantic

from ..schema_name import DEFAULT_SCHEMA, quote_schema

STATUSES = ("pending", "running", "completed", "failed", "canceled")


class QueueCounts(pydantic.BaseModel):
    """One queue: its jobs by status (every status present, 0 when none) and in total."""

    queue: str
    counts: dict[str, int]
    total: int


async def queue_counts(conn: Any, *, schema: str = DEFAULT_SCHEMA) -> list[QueueCounts]:
    """Every queue that has jobs, sorted by name (``conn``: an asyncpg connection)."""
    rows = await conn.fetch(
        f"SELECT queue, status, count(*) AS n FROM {quote_schema(schema)}.jobs"
        " GROUP BY queue, status"
    )
    by_queue: dict[str, dict[str, int]] = {}
    for row in rows:
        counts = by_queue.setdefault(row["queue"], dict.fromkeys(STATUSES, 0))
        counts[str(row["status"])] = int(row["n"])
    return [
        QueueCounts(queue=q, counts=c, total=sum(c.values())) for q, c in sorted(by_queue.items())
    ]
