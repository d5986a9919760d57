"""Reading and steering jobs from any connection: get, list_jobs, cancel, retry.

Each runs in the caller's transaction when there is one (cancel and retry in a savepoint of
it), on an asyncpg Connection or Pool or a psycopg AsyncConnection.
"""

from __future__ import annotations

from typing import Any

from ..drivers import session_for
from ..schema_name import DEFAULT_SCHEMA, check_schema
from .model import FINAL, STATUSES, JobRun, from_row
from .queue import wake_queue
from .registry import lookup
from .runner import call_on_complete

LIST_MAX = 10_000


def _check_id(job_id: object) -> int:
    if isinstance(job_id, bool) or not isinstance(job_id, int):
        raise TypeError(f"a job id is an int, got {type(job_id).__name__}")
    return job_id


async def get(conn: Any, id: int, *, schema: str = DEFAULT_SCHEMA) -> JobRun | None:
    """The job ``id``, or None (never dispatched, or deleted after its retention)."""
    job_id = _check_id(id)
    async with session_for(conn, check_schema(schema)) as s:
        row = await s.fetchrow("jobs_get", job_id)
    return None if row is None else from_row(row)


async def list_jobs(
    conn: Any,
    *,
    queue: str | None = None,
    type: str | None = None,
    status: str | None = None,
    limit: int = 100,
    schema: str = DEFAULT_SCHEMA,
) -> list[JobRun]:
    """Jobs, newest first, filtered by queue, type and status (each None: any)."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= LIST_MAX:
        raise ValueError(f"limit must be an int from 1 to {LIST_MAX}, got {limit!r}")
    for what, value in (("queue", queue), ("type", type)):
        if value is not None and not isinstance(value, str):
            raise TypeError(f"{what} must be a str or None, got {value!r}")
    async with session_for(conn, check_schema(schema)) as s:
        rows = await s.fetch("jobs_list", queue, type, status, limit)
    return [from_row(row) for row in rows]


async def queue_counts(
    conn: Any, *, queue: str | None = None, schema: str = DEFAULT_SCHEMA
) -> dict[str, dict[str, int]]:
    """Jobs per queue and status, every status present (0 when none): for status pages.

    Queues with no job at all are absent."""
    if queue is not None and not isinstance(queue, str):
        raise TypeError(f"queue must be a str or None, got {queue!r}")
    async with session_for(conn, check_schema(schema)) as s:
        rows = await s.fetch("jobs_counts", queue)
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        counts.setdefault(row["queue"], dict.fromkeys(STATUSES, 0))[row["status"]] = int(row["n"])
    return counts


async def cancel(conn: Any, id: int, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Cancel the job ``id``; False if it is already final (or unknown).

    A pending job is canceled at once and never runs. A running one is flagged: its handler's
    ``ctx.cancelled()`` turns True, and it ends canceled whatever it returns. ``on_complete``
    runs once, in the transaction that records ``canceled``: this one for a pending job, when
    this process registered its type; otherwise the queue's loop records it (the job stays
    pending with ``cancel_requested`` until then, and still never runs).
    """
    job_id = _check_id(id)
    async with session_for(conn, check_schema(schema)) as s, s.raw.transaction():
        row = await s.fetchrow("jobs_lock", job_id)
        if row is None or row["status"] in FINAL:
            return False
        if row["status"] == "pending":
            spec = lookup(row["type"])
            if not row["on_complete"] or (spec is not None and spec.on_complete is not None):
                done = await s.fetchrow("jobs_cancel_now", job_id)
                if done is not None:
                    await call_on_complete(s.raw, from_row(done))
                    return True
        flagged = await s.fetchrow("jobs_request_cancel", job_id)
        if flagged is None:
            return False
        if flagged["status"] == "pending":
            await wake_queue(s.raw, flagged["queue"], schema)
        return True


async def retry(conn: Any, id: int, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Put a failed or canceled job back to pending with attempts 0, and wake its queue;
    False for any other status (or an unknown id)."""
    job_id = _check_id(id)
    async with session_for(conn, check_schema(schema)) as s, s.raw.transaction():
        row = await s.fetchrow("jobs_retry", job_id)
        if row is None:
            return False
        await wake_queue(s.raw, row["queue"], schema)
    return True
