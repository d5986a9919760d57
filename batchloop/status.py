"""Turning rows into the public status models (shared by the async and sync APIs)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from .drivers.base import Row
from .models import Config, Owner, WorkerStatus


def to_status(row: Row) -> WorkerStatus:
    owner = None
    if row["host_id"] is not None:
        owner = Owner(host_id=row["host_id"], hostname=row["hostname"], pid=row["pid"])
    return WorkerStatus(
        name=row["name"],
        state=row["status"],
        generation=row["generation"],
        owner=owner,
        work_query=row["work_query"],
        worker=row["worker"],
        config=parse_config(row["config"]),
        last_work_at=row["last_work_at"],
        next_run_at=row["next_run_at"],
        batches=row["batches"],
        consecutive_failures=row["consecutive_failures"],
        last_error=row["last_error"],
        last_error_at=row["last_error_at"],
        created_at=row["created_at"],
    )


def to_statuses(rows: Sequence[Row]) -> list[WorkerStatus]:
    return [to_status(r) for r in rows]


def parse_config(value: Any) -> Config:
    """Stored config; keys a newer version added are dropped rather than refused."""
    data = json.loads(value) if isinstance(value, str | bytes) else dict(value)
    return Config(**{k: v for k, v in data.items() if k in Config.model_fields})
