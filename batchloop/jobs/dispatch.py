"""Creating jobs in the caller's transaction: validate first, then one statement that inserts
and pings the queue's loop (the ping is in the same transaction: the loop sees the job once
that commits; free while the loop runs)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..drivers import session_for
from ..schema_name import check_schema
from .queue import ping_of
from .registry import JobSpec

KEY_MAX = 1000
INSERT_TRIES = 5
"""A key's job deleted (retention) between our INSERT and SELECT: try again, a few times."""


def encode(spec: JobSpec, payload: Any) -> str:
    """The payload validated against the handler's annotation, as JSON text."""
    value = spec.adapter.validate_python(payload)
    text = spec.adapter.dump_json(value).decode()
    if "\\u0000" in text:
        raise ValueError(
            f"job {spec.type!r}: the payload holds a NUL character (\\u0000), which "
            "PostgreSQL's jsonb refuses"
        )
    return text


def _when(delay: float, run_at: datetime | None) -> tuple[datetime | None, float]:
    if isinstance(delay, bool) or not isinstance(delay, int | float) or not math.isfinite(delay):
        raise ValueError(f"delay must be a number of seconds, got {delay!r}")
    if delay < 0:
        raise ValueError(f"delay must be >= 0 seconds, got {delay!r}")
    if run_at is not None:
        if not isinstance(run_at, datetime) or run_at.tzinfo is None:
            raise ValueError(f"run_at must be an aware datetime, got {run_at!r}")
        if delay:
            raise ValueError("give delay or run_at, not both")
    return run_at, float(delay)


async def dispatch(
    spec: JobSpec,
    conn: Any,
    payload: Any,
    key: str | None,
    delay: float,
    run_at: datetime | None,
    schema: str,
) -> int:
    text = encode(spec, payload)
    when, seconds = _when(delay, run_at)
    if key is not None and (
        not isinstance(key, str) or not 1 <= len(key) <= KEY_MAX or "\x00" in key
    ):
        raise ValueError(
            f"key must be a string of 1 to {KEY_MAX} characters without NUL, got {key!r}"
        )
    check_schema(schema)
    args = (spec.type, spec.queue, text, key, spec.max_attempts, spec.lease, when, seconds)
    wake = ping_of(spec.queue)
    async with session_for(conn, schema) as s:
        for _ in range(INSERT_TRIES):
            job_id = await s.fetchval("jobs_insert", *args, spec.on_complete is not None, *wake)
            if job_id is not None:
                return int(job_id)
            # The key is taken (the INSERT waited for an uncommitted first dispatch to end).
            existing = await s.fetchval("jobs_by_key", spec.type, key)
            if existing is not None:
                return int(existing)
    raise RuntimeError(f"job {spec.type!r} key {key!r}: the keyed job kept disappearing")


async def dispatch_many(
    spec: JobSpec,
    conn: Any,
    payloads: Sequence[Any],
    delay: float,
    run_at: datetime | None,
    schema: str,
) -> list[int]:
    if isinstance(payloads, str | bytes) or not isinstance(payloads, Sequence):
        raise TypeError(f"payloads must be a list, got {type(payloads).__name__}")
    texts = [encode(spec, payload) for payload in payloads]
    when, seconds = _when(delay, run_at)
    check_schema(schema)
    if not texts:
        return []
    async with session_for(conn, schema) as s:
        rows = await s.fetch(
            "jobs_insert_many",
            spec.type,
            spec.queue,
            texts,
            spec.max_attempts,
            spec.lease,
            when,
            seconds,
            spec.on_complete is not None,
            *ping_of(spec.queue),
        )
    # nextval() ran in the payloads' order, so sorted ids are in that order.
    return sorted(int(row["id"]) for row in rows)
