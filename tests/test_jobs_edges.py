"""batchloop.jobs at its edges: the decorator's checks, a host leaving mid-job, on_complete
raising, handlers returning what cannot be stored, a host without the queue's types."""

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


async def handler(ctx: jobs.JobContext, payload: int) -> None:
    return None


def test_the_decorator_refuses_what_cannot_run() -> None:
    with pytest.raises(ValueError, match="job type"):
        jobs.job("")
    with pytest.raises(ValueError, match="queue"):
        jobs.job("x.q", queue="q" * 196)
    with pytest.raises(ValueError, match="max_attempts"):
        jobs.job("x.a", max_attempts=0)
    with pytest.raises(ValueError, match="concurrency"):
        jobs.job("x.c", concurrency=0)
    with pytest.raises(ValueError, match="lease"):
        jobs.job("x.l", lease=float("inf"))
    with pytest.raises(TypeError, match="async def"):
        jobs.job("x.s")(lambda ctx, payload: None)  # type: ignore[arg-type,return-value]

    async def nested(ctx: jobs.JobContext, payload: int) -> None:
        return None

    with pytest.raises(TypeError, match="module-level"):
        jobs.job("x.n")(nested)
    with pytest.raises(TypeError, match="already registered"):
        jobs.job("t.echo", queue="core")(handler)
    with pytest.raises(ValueError, match="concurrency=3"):
        jobs.job("x.limited", queue="limited", concurrency=4)(handler)


async def test_progress_must_be_a_percentage(conn: asyncpg.Connection) -> None:
    from batchloop.jobs.context import JobContext

    ctx = JobContext.__new__(JobContext)
    for bad in (-1, 101, 50.5, True):
        with pytest.raises(ValueError, match="progress"):
            await ctx.progress(bad)  # type: ignore[arg-type]


async def test_a_host_leaving_mid_job_hands_the_job_back_at_once(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"], shutdown_grace=0.2):
        job_id = await jobs_core.gated.dispatch(conn, jobs_core.Item(n=1))
        await wait_for(lambda: jobs.get(conn, job_id), expect=lambda r: r and r.progress == 40)
    run = await jobs.get(conn, job_id)
    assert run is not None and run.status == "running" and run.lease_until is not None
    assert await conn.fetchval("SELECT $1 <= now()", run.lease_until)  # not 60 s away
    jobs_core.gate(1).set()
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        await wait_for(lambda: _status(conn, job_id), expect="completed")
    run = await jobs.get(conn, job_id)
    assert run is not None and run.attempts == 2
    assert jobs_core.STARTED == [(1, 1), (1, 2)]
    assert await conn.fetchval("SELECT count(*) FROM completions") == 1


async def test_on_complete_raising_is_rolled_back_and_the_state_recorded(
    conn: asyncpg.Connection, migrated_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        ok = await jobs_core.loud.dispatch(conn, jobs_core.Item(n=1))
        other = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=2))
        await wait_for(lambda: _status(conn, ok), expect="completed")
        await wait_for(lambda: _status(conn, other), expect="completed")
    assert (ok, "completed") in jobs_core.COMPLETED  # called once...
    rows = await conn.fetch("SELECT job_id FROM completions")
    assert [r["job_id"] for r in rows] == [other]  # ...and its write rolled back
    assert "on_complete raised" in caplog.text


async def test_a_result_that_is_not_an_object_fails_the_attempt(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.loud.dispatch(conn, jobs_core.Item(n=-1))
        await wait_for(lambda: _status(conn, job_id), expect="failed", timeout=20)
    run = await jobs.get(conn, job_id)
    assert run is not None and run.attempts == 5
    assert (
        run.error == "TypeError: a handler returns a dict (or a pydantic model) or None, got list"
    )


async def test_a_host_without_the_queues_types_says_so(
    conn: asyncpg.Connection, migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchloop.jobs import queue

    await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1))
    monkeypatch.setattr(queue, "types_of", lambda q: [])
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        st = await wait_for(
            lambda: bl.status(conn, jobs.queue_name("core")),
            expect=lambda s: s is not None and s.last_error is not None,
        )
    assert "registers no job type of it" in st.last_error  # type: ignore[operator]
    assert jobs_core.STARTED == []


async def test_a_queue_paused_with_batchloop_stop_resumes_with_start(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    name = jobs.queue_name("core")
    first = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1))
    assert await bl.stop(conn, name) is True
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        second = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=2))
        st = await bl.status(conn, name)
        assert st is not None and st.state == "stopped" and st.owner is None
        assert await _status(conn, second) == "pending"
        assert await bl.start(conn, name) is True
        await wait_for(lambda: _status(conn, second), expect="completed")
        await wait_for(lambda: _status(conn, first), expect="completed")
