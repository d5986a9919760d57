"""What a job looks like to its readers: :class:`JobRun`, one row of the jobs table."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Literal

import pydantic

Status = Literal["pending", "running", "completed", "failed", "canceled"]
STATUSES: tuple[Status, ...] = ("pending", "running", "completed", "failed", "canceled")
FINAL: frozenset[str] = frozenset({"completed", "failed", "canceled"})


class JobRun(pydantic.BaseModel):
    """A job and where it stands, as :func:`batchloop.jobs.get` reads it.

    ``attempts`` is counted when a run starts (1 while the first run is in progress);
    ``progress`` is what the handler last reported (0..100; 100 once completed); ``error``
    is the last failure's message, kept across retries; ``result`` the handler's return value;
    ``payload`` is the dispatched value as JSON (a dict for a pydantic model).
    ``cancel_requested`` says a cancel arrived while it ran; ``lease_until`` is the running
    attempt's deadline (the job runs again after it, if its host died).
    """

    model_config = pydantic.ConfigDict(frozen=True)

    id: int
    type: str
    queue: str
    status: Status
    payload: Any
    result: dict[str, Any] | None
    error: str | None
    progress: int
    attempts: int
    max_attempts: int
    key: str | None
    run_at: datetime
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    cancel_requested: bool = False
    lease_until: datetime | None = None

    @property
    def finished(self) -> bool:
        """Whether the job reached a final state (completed, failed or canceled)."""
        return self.status in FINAL


def _json(value: Any) -> Any:
    # asyncpg hands jsonb over as text, psycopg as the decoded value.
    return json.loads(value) if isinstance(value, str | bytes) else value


def from_row(row: Mapping[str, Any]) -> JobRun:
    return JobRun(
        id=row["id"],
        type=row["type"],
        queue=row["queue"],
        status=row["status"],
        payload=_json(row["payload"]),
        result=_json(row["result"]),
        error=row["error"],
        progress=row["progress"],
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        key=row["key"],
        run_at=row["run_at"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        cancel_requested=row["cancel_requested"],
        lease_until=row["lease_until"],
    )
