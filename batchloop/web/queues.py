"""Job queues counted by status, for the status page (``/api/queues``).

:func:`batchloop.jobs.queue_counts` is one ``GROUP BY`` over the jobs table per refresh: the
table stays small (retention deletes finished jobs), so that scan stays cheap.
"""

from __future__ import annotations

from typing import Any

import pydantic

from ..schema_name import DEFAULT_SCHEMA


class QueueCounts(pydantic.BaseModel):
    """One queue: its jobs by status (every status present, 0 when none) and in total."""

    queue: str
    counts: dict[str, int]
    total: int


async def queue_counts(conn: Any, *, schema: str = DEFAULT_SCHEMA) -> list[QueueCounts]:
    """Every queue that has jobs, sorted by name."""
    from .. import jobs

    found = await jobs.queue_counts(conn, schema=schema)
    return [QueueCounts(queue=q, counts=c, total=sum(c.values())) for q, c in sorted(found.items())]
