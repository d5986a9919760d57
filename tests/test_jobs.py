"""batchloop.jobs on real PostgreSQL with real hosts: lifecycle, retries, cancel, retry,
on_complete exactly once, idempotent keys, delays, bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import jobs_core
import pytest

import batchloop as bl
import batchloop.jobs as jobs

from helpers import wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def conn(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(migrated_dsn)
    await c.execute(
        "CREATE TABLE completions (job_id bigint NOT NULL, status text NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    jobs_core.STARTED.clear()
    jobs_core.COMPLETED.clear()
    jobs_core.GATES.clear()
    try:
        yield c
    finally:
        await c.close()


async def _status(conn: asyncpg.Connection, job_id: int) -> str | None:
    run = await jobs.get(conn, job_id)
    return None if run is None else run.status


async def test_a_job_runs_to_completion_with_its_result(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        async with conn.transaction():
            job_id = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=7))
        await wait_for(lambda: _status(conn, job_id), expect="completed")
    run = await jobs.get(conn, job_id)
    assert run is not None
    assert run.result == {"n": 7, "attempt": 1}
    assert run.payload == {"n": 7, "fail_times": 0, "sleep": 0.0}
    assert (run.attempts, run.progress, run.error, run.type, run.queue) == (
        1,
        100,
        None,
        "t.echo",
        "core",
    )
    assert run.started_at is not None and run.completed_at is not None
    assert run.created_at <= run.started_at <= run.completed_at
    rows = await conn.fetch("SELECT job_id, status FROM completions")
    assert [tuple(r) for r in rows] == [(job_id, "completed")]
