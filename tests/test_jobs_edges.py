"""batchloop.jobs at its edges: the decorator's checks, a host leaving mid-job, on_complete
raising, handlers returning what cannot be stored, a host without the queue's types."""

from __future__ import annotations

import datetime
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import jobs_core
import pydantic
import pytest

import batchloop as bl
import batchloop.jobs as jobs

from helpers import wait_for

pytestmark = pytest.mark.anyio


@pytest.fixture
async def conn(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await jobs_core.connect_fresh(migrated_dsn)
    try:
        yield c
    finally:
        await c.close()


async def handler(ctx: jobs.JobContext, payload: int) -> None:
    return None


async def handler_shared5(ctx: jobs.JobContext, payload: int) -> None:
    return None


async def handler_shared3(ctx: jobs.JobContext, payload: int) -> None:
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


def test_types_of_a_queue_share_the_smallest_concurrency_and_longest_retention(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from batchloop.jobs.registry import DEFAULT_RETENTION, queue_settings

    jobs.job("x.shared5", queue="x-shared", concurrency=5)(handler_shared5)
    assert queue_settings("x-shared").concurrency == 5
    jobs.job("x.shared3", queue="x-shared", concurrency=3, retention=60.0)(handler_shared3)
    assert "types of a queue share one concurrency: the smallest applies" in caplog.text
    settings = queue_settings("x-shared")
    assert (settings.concurrency, settings.retention) == (3, 60.0)
    assert queue_settings("nothing-here").retention == DEFAULT_RETENTION


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
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="completed")
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
        await wait_for(lambda: jobs_core.status(conn, ok), expect="completed")
        await wait_for(lambda: jobs_core.status(conn, other), expect="completed")
    assert (ok, "completed") in jobs_core.COMPLETED  # called once...
    rows = await conn.fetch("SELECT job_id FROM completions")
    assert [r["job_id"] for r in rows] == [other]  # ...and its write rolled back
    assert "on_complete raised" in caplog.text


async def test_a_result_that_is_not_an_object_fails_the_attempt(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.loud.dispatch(conn, jobs_core.Item(n=-1))
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="failed", timeout=20)
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
        assert await jobs_core.status(conn, second) == "pending"
        assert await bl.start(conn, name) is True
        await wait_for(lambda: jobs_core.status(conn, second), expect="completed")
        await wait_for(lambda: jobs_core.status(conn, first), expect="completed")


async def test_a_payload_class_defined_after_its_handler_validates(
    conn: asyncpg.Connection,
) -> None:
    job_id = await jobs_core.later.dispatch(conn, {"x": "1"}, delay=3600)  # type: ignore[arg-type]
    run = await jobs.get(conn, job_id)
    assert run is not None and run.payload == {"x": 1}
    with pytest.raises(pydantic.ValidationError):
        await jobs_core.later.dispatch(conn, {"x": "one"})  # type: ignore[arg-type]


async def test_a_dead_lease_of_an_unknown_type_does_not_keep_the_loop_polling(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    await conn.execute(
        "INSERT INTO batchloop.jobs (type, queue, status, payload, max_attempts, lease_seconds,"
        " attempts, lease_until) VALUES ('ghost', 'core', 'running', '{}', 3, 60, 1,"
        " now() - interval '1 minute')"
    )
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1))
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="completed")
        # Nothing it can run is due: the loop goes to sleep (idle or waiting), no polling.
        await wait_for(
            lambda: bl.status(conn, jobs.queue_name("core")),
            expect=lambda s: s is not None and s.state in ("idle", "waiting"),
        )


@pytest.mark.parametrize("module", ["batchloop.jobs", "batchloop.jobs.registry"])
def test_the_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0 and result.failed == 0


async def test_a_result_the_database_refuses_fails_that_job_only(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    ids = await jobs_core.odd.dispatch_many(conn, [jobs_core.Item(n=n) for n in (1, 2, 3)])
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):

        async def finished() -> bool:
            runs = [await jobs.get(conn, job_id) for job_id in ids]
            return all(r is not None and r.finished for r in runs)

        await wait_for(finished)
    runs = [await jobs.get(conn, job_id) for job_id in ids]
    assert [r.status for r in runs if r is not None] == ["failed", "failed", "completed"]
    assert runs[0] is not None and runs[0].error == (
        "ValueError: the result holds Infinity or NaN, which JSON cannot store"
    )
    assert runs[1] is not None and runs[1].error is not None
    assert runs[1].error.startswith("could not record the attempt's outcome:")
    assert "numeric" in runs[1].error
    assert runs[2] is not None and runs[2].result == {"n": 3}
    assert sorted(jobs_core.COMPLETED) == sorted(
        [(ids[0], "failed"), (ids[1], "failed"), (ids[2], "completed")]
    )


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_sqlalchemy_sessions_dispatch_in_their_transaction(
    conn: asyncpg.Connection, migrated_dsn: str, driver: str
) -> None:
    pytest.importorskip("sqlalchemy")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    engine = create_async_engine(migrated_dsn.replace("postgresql://", f"postgresql+{driver}://"))
    try:
        async with AsyncSession(engine) as session:
            async with session.begin():
                kept = await jobs_core.echo.dispatch(session, jobs_core.Item(n=1), delay=3600)
            async with session.begin():
                await jobs_core.echo.dispatch(session, jobs_core.Item(n=2), delay=3600)
                await session.rollback()
            async with session.begin():
                assert await jobs.cancel(session, kept) is True
                run = await jobs.get(session, kept)
                assert run is not None and run.status == "canceled"
    finally:
        await engine.dispose()
    rows = await conn.fetch("SELECT id, status FROM batchloop.jobs")
    assert [tuple(r) for r in rows] == [(kept, "canceled")]
    assert [(kept, "canceled")] == jobs_core.COMPLETED


# docs/deployment.md's grants for an application role, unchanged: jobs need nothing more (the
# jobs table's id is an identity column, so no sequence grant either).
APP_GRANTS = """
REVOKE ALL ON DATABASE {database} FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA batchloop FROM PUBLIC;
GRANT CONNECT ON DATABASE {database} TO {role};
GRANT USAGE ON SCHEMA batchloop TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA batchloop TO {role};
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA batchloop TO {role};
GRANT SELECT, INSERT ON completions TO {role};
"""


async def test_an_application_role_with_the_documented_grants_runs_jobs(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    if not await conn.fetchval(
        "SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user"
    ):
        pytest.skip("the test server's user may not create roles")
    role = f"bltest_jobs_{uuid.uuid4().hex[:10]}"
    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD '{role}'")
    try:
        await conn.execute(APP_GRANTS.format(database=f'"{database}"', role=f'"{role}"'))
        parts = urlsplit(migrated_dsn)
        host = parts.netloc.rpartition("@")[2]
        app_dsn = urlunsplit(parts._replace(netloc=f"{role}:{role}@{host}"))
        app = await asyncpg.connect(app_dsn)
        try:
            async with bl.Host(app_dsn, modules=["jobs_core"]):
                async with app.transaction():
                    job_id = await jobs_core.echo.dispatch(app, jobs_core.Item(n=1), key="k")
                later = await jobs_core.echo.dispatch(app, jobs_core.Item(n=2), delay=3600)
                await wait_for(lambda: jobs_core.status(app, job_id), expect="completed")
                assert await jobs.cancel(app, later) is True
                assert await jobs.retry(app, later) is True
                await wait_for(lambda: jobs_core.status(app, later), expect="completed")
                assert (await jobs.queue_counts(app))["core"]["completed"] == 2
        finally:
            await app.close()
    finally:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await conn.execute(f'DROP OWNED BY "{role}"')
        await conn.execute(f'DROP ROLE "{role}"')


async def test_the_lease_is_extended_while_the_handler_runs(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.long.dispatch(conn, jobs_core.Item(n=1, sleep=2.0))
        first = await wait_for(lambda: jobs.get(conn, job_id), expect=lambda r: r.lease_until)
        later = await wait_for(
            lambda: jobs.get(conn, job_id),
            expect=lambda r: r.status != "running" or r.lease_until > first.lease_until,
        )
        assert later.status == "running"  # extended before it ended
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="completed")
    run = await jobs.get(conn, job_id)
    assert run is not None and run.attempts == 1 and run.result == {"attempt": 1}
    assert jobs_core.STARTED == [(1, 1)]  # three leases long, never run twice


@pytest.mark.batchloop_modules("jobs_core")
async def test_the_testing_kits_host_runs_jobs(batchloop_dsn: str, batchloop_host: bl.Host) -> None:
    async with batchloop_host.pool.acquire() as c:
        async with c.transaction():
            job_id = await jobs_core.later.dispatch(c, jobs_core.Later(x=1))
        await wait_for(lambda: jobs_core.status(c, job_id), expect="completed")


async def test_a_host_with_a_single_pool_connection_still_runs_its_jobs(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    ids = await jobs_core.echo.dispatch_many(conn, [jobs_core.Item(n=n) for n in range(30)])
    async with bl.Host(migrated_dsn, modules=["jobs_core"], pool_min_size=1, pool_max_size=1):
        await wait_for(
            lambda: conn.fetchval(
                "SELECT count(*) FROM batchloop.jobs WHERE id = ANY($1) AND status = 'completed'",
                ids,
            ),
            expect=len(ids),
            timeout=30,
        )
    assert await conn.fetchval("SELECT count(*) FROM completions") == len(ids)


async def test_a_lease_whose_commit_went_unanswered_starts_what_committed(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    from batchloop.jobs.runner import runtime_of

    lease = (
        "UPDATE batchloop.jobs SET status = 'running', attempts = attempts + 1,"
        " started_at = now(), lease_until = now() + interval '1 hour' WHERE id = $1 RETURNING *"
    )
    async with bl.Host(migrated_dsn, modules=["jobs_core"]) as host:
        # Delayed: the loop leaves them alone; this test leases them itself.
        committed = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1), delay=3600)
        rolled_back = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=2), delay=3600)
        row = dict(await conn.fetchrow(lease, committed))
        # As if the loop's lease of rolled_back had been rolled back and the job leased again
        # by someone else since: same attempt number, another transaction.
        other = dict(await conn.fetchrow(lease, rolled_back))
        other["started_at"] -= datetime.timedelta(seconds=1)
        runtime_of(host).verify([row, other])
        await wait_for(lambda: jobs_core.status(conn, committed), expect="completed")
        assert jobs_core.STARTED == [(1, 1)]
    assert await jobs_core.status(conn, rolled_back) == "running"  # not ours: never started here
