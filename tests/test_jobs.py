"""batchloop.jobs on real PostgreSQL with real hosts: lifecycle, retries, cancel, retry,
on_complete exactly once, idempotent keys, delays, bad input."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import jobs_core
import psycopg
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


async def test_a_job_runs_to_completion_with_its_result(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        async with conn.transaction():
            job_id = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=7))
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="completed")
    run = await jobs.get(conn, job_id)
    assert run is not None
    assert run.result == {"n": 7, "attempt": 1}
    assert run.payload == {"n": 7, "fail_times": 0, "sleep": 0.0, "note": ""}
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


async def test_progress_is_visible_while_the_job_runs(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.gated.dispatch(conn, jobs_core.Item(n=1))
        running = await wait_for(
            lambda: jobs.get(conn, job_id), expect=lambda r: r is not None and r.progress == 40
        )
        assert (running.status, running.attempts, running.completed_at) == ("running", 1, None)
        assert running.lease_until is not None and running.started_at is not None
        jobs_core.gate(1).set()
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="completed")


def test_backoff_is_exponential_with_jitter_and_the_first_retry_within_a_second() -> None:
    from batchloop.jobs.outcomes import RETRY_CAP, backoff

    assert 0 < backoff(1, 0.0) < backoff(1, 0.999) <= 1.0
    assert [backoff(n, 0.0) for n in (1, 2, 3)] == [0.25, 0.5, 1.0]
    assert backoff(2, 0.999) < 2 * backoff(2, 0.0)
    assert backoff(100, 0.999) <= RETRY_CAP


async def test_a_failing_job_is_retried_then_fails_without_blocking_others(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        bad = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1, fail_times=99))
        good = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=2))
        await wait_for(lambda: jobs_core.status(conn, good), expect="completed")
        await wait_for(lambda: jobs_core.status(conn, bad), expect="failed")
        again = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=3, fail_times=1))
        await wait_for(lambda: jobs_core.status(conn, again), expect="completed")
    run = await jobs.get(conn, bad)
    assert run is not None
    assert (run.attempts, run.max_attempts, run.result) == (3, 3, None)
    assert run.error == "RuntimeError: failing attempt 3"
    assert [a for n, a in jobs_core.STARTED if n == 1] == [1, 2, 3]
    assert [a for n, a in jobs_core.STARTED if n == 3] == [1, 2]
    done = await jobs.get(conn, again)
    assert done is not None and done.result == {"n": 3, "attempt": 2} and done.error is None
    rows = await conn.fetch("SELECT job_id, status FROM completions ORDER BY job_id")
    assert sorted(tuple(r) for r in rows) == [
        (bad, "failed"),
        (good, "completed"),
        (again, "completed"),
    ]


async def test_non_retryable_fails_at_once(conn: asyncpg.Connection, migrated_dsn: str) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.fatal.dispatch(conn, {"n": 5})
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="failed")
    run = await jobs.get(conn, job_id)
    assert run is not None and run.attempts == 1 and run.max_attempts == 5
    assert run.error == "NonRetryable: no way: 5"


async def test_cancel_pending_running_and_final(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        later = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1), delay=3600)
        assert await jobs.cancel(conn, later) is True
        run = await jobs.get(conn, later)
        assert run is not None and run.status == "canceled" and run.completed_at is not None
        assert [(later, "canceled")] == jobs_core.COMPLETED  # in cancel's own transaction

        busy = await jobs_core.gated.dispatch(conn, jobs_core.Item(n=2))
        await wait_for(lambda: jobs.get(conn, busy), expect=lambda r: r and r.progress == 40)
        assert await jobs.cancel(conn, busy) is True
        assert (await jobs.get(conn, busy)).status == "running"  # type: ignore[union-attr]
        jobs_core.gate(2).set()
        await wait_for(lambda: jobs_core.status(conn, busy), expect="canceled")
        assert await jobs.cancel(conn, busy) is False
        assert await jobs.cancel(conn, later) is False
        assert await jobs.cancel(conn, 10**9) is False
    assert (await jobs.get(conn, busy)).result == {"stopped": True}  # type: ignore[union-attr]
    assert [n for n, _ in jobs_core.STARTED] == [2]  # the pending one never ran
    rows = await conn.fetch("SELECT job_id, status FROM completions ORDER BY job_id")
    assert [tuple(r) for r in rows] == [(later, "canceled"), (busy, "canceled")]


async def test_a_cancel_from_a_process_without_the_handler_is_recorded_by_the_loop(
    conn: asyncpg.Connection, migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1), delay=3600)
    from batchloop.jobs import admin

    monkeypatch.setattr(admin, "lookup", lambda type_: None)  # as in the CLI's process
    assert await jobs.cancel(conn, job_id) is True
    monkeypatch.undo()
    run = await jobs.get(conn, job_id)
    assert run is not None and (run.status, run.cancel_requested) == ("pending", True)
    assert jobs_core.COMPLETED == []
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="canceled")
    assert jobs_core.STARTED == []
    rows = await conn.fetch("SELECT job_id, status FROM completions")
    assert [tuple(r) for r in rows] == [(job_id, "canceled")]


async def test_retry_puts_a_failed_job_back_to_pending(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    jobs_core.FLAKY["fail"] = True
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.flaky.dispatch(conn, jobs_core.Item(n=1))
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="failed")
        jobs_core.FLAKY["fail"] = False
        async with conn.transaction():
            assert await jobs.retry(conn, job_id) is True
            run = await jobs.get(conn, job_id)
            assert run is not None and (run.status, run.attempts) == ("pending", 0)
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="completed")
        assert await jobs.retry(conn, job_id) is False  # completed
        assert await jobs.retry(conn, 10**9) is False
    run = await jobs.get(conn, job_id)
    assert run is not None and run.attempts == 1 and run.result == {"n": 1}
    rows = await conn.fetch("SELECT job_id, status FROM completions ORDER BY at")
    assert [tuple(r) for r in rows] == [(job_id, "failed"), (job_id, "completed")]


async def test_a_stale_attempt_cannot_overwrite_a_newer_one(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        job_id = await jobs_core.gated.dispatch(conn, jobs_core.Item(n=1))
        await wait_for(lambda: jobs.get(conn, job_id), expect=lambda r: r and r.progress == 40)
        # As if its lease had expired and another host's attempt 2 had taken it.
        await conn.execute(
            "UPDATE batchloop.jobs SET attempts = 2, lease_until = now() + interval '1 hour',"
            " progress = 0 WHERE id = $1",
            job_id,
        )
        jobs_core.gate(1).set()
        await wait_for(lambda: jobs_core.STARTED, expect=[(1, 1)])
        # Attempt 1 finished (it saw itself canceled: lease lost); nothing of it is recorded.
        from batchloop.jobs.runner import _runtimes

        await wait_for(lambda: all(not r.attempts for r in _runtimes.values()))
        run = await jobs.get(conn, job_id)
        assert run is not None
        assert (run.status, run.attempts, run.progress, run.result) == ("running", 2, 0, None)
        assert jobs_core.COMPLETED == []
        await conn.execute("UPDATE batchloop.jobs SET lease_until = now() WHERE id = $1", job_id)
        await wait_for(lambda: jobs_core.status(conn, job_id), expect="completed")
    assert await conn.fetchval("SELECT count(*) FROM completions") == 1


async def test_a_key_makes_dispatch_idempotent(conn: asyncpg.Connection, migrated_dsn: str) -> None:
    first = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1), key="k1", delay=3600)
    again = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=2), key="k1")
    other = await jobs_core.gated.dispatch(conn, jobs_core.Item(n=3), key="k1", delay=3600)
    assert again == first != other
    assert await conn.fetchval("SELECT count(*) FROM batchloop.jobs") == 2


async def test_a_second_dispatch_waits_for_an_uncommitted_first(migrated_dsn: str) -> None:
    a = await asyncpg.connect(migrated_dsn)
    b = await asyncpg.connect(migrated_dsn)
    try:
        for outcome in ("commit", "rollback"):
            key = f"k-{outcome}"
            tx = a.transaction()
            await tx.start()
            first = await jobs_core.echo.dispatch(a, jobs_core.Item(n=1), key=key, delay=3600)
            second = asyncio.ensure_future(
                jobs_core.echo.dispatch(b, jobs_core.Item(n=2), key=key, delay=3600)
            )
            await wait_for(
                lambda: a.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                ),
                expect=1,
            )
            assert not second.done()
            await (tx.commit() if outcome == "commit" else tx.rollback())
            got = await asyncio.wait_for(second, 10)
            assert (got == first) is (outcome == "commit")
        assert await a.fetchval("SELECT count(*) FROM batchloop.jobs") == 2
    finally:
        await a.close()
        await b.close()


async def test_delay_and_run_at_wake_the_loop_with_no_ping(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        delayed = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1), delay=1.5)
        when = await conn.fetchval("SELECT now() + interval '2 seconds'")
        timed = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=2), run_at=when)
        st = await wait_for(
            lambda: bl.status(conn, jobs.queue_name("core")),
            expect=lambda s: s is not None and s.state == "waiting",
        )
        assert st.next_run_at is not None
        await wait_for(lambda: jobs_core.status(conn, timed), expect="completed", timeout=15)
        await wait_for(lambda: jobs_core.status(conn, delayed), expect="completed")
    for job_id in (delayed, timed):
        run = await jobs.get(conn, job_id)
        assert run is not None and run.started_at is not None
        assert run.started_at >= run.run_at > run.created_at


async def test_a_bad_payload_is_refused_before_any_sql(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    with pytest.raises(pydantic.ValidationError):
        await jobs_core.echo.dispatch(conn, {"n": "seven"})
    with pytest.raises(pydantic.ValidationError):
        await jobs_core.echo.dispatch_many(conn, [{"n": 1}, {"m": 2}])
    with pytest.raises(ValueError, match="delay"):
        await jobs_core.echo.dispatch(conn, {"n": 1}, delay=-1)
    with pytest.raises(ValueError, match="NUL"):
        await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1, note="a\x00b"))
    with pytest.raises(ValueError, match="key"):
        await jobs_core.echo.dispatch(conn, {"n": 1}, key="")
    assert await conn.fetchval("SELECT count(*) FROM batchloop.jobs") == 0
    assert await bl.status(conn, jobs.queue_name("core")) is None


async def test_a_payload_that_no_longer_validates_fails_that_job_only(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    stale = await conn.fetchval(
        "INSERT INTO batchloop.jobs (type, queue, payload, max_attempts, lease_seconds)"
        " VALUES ('t.echo', 'core', '{\"n\": \"seven\"}', 3, 60) RETURNING id"
    )
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        good = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1))
        await wait_for(lambda: jobs_core.status(conn, good), expect="completed")
        await wait_for(lambda: jobs_core.status(conn, stale), expect="failed")
    run = await jobs.get(conn, stale)
    assert run is not None and run.attempts == 1
    assert run.error is not None
    assert run.error.startswith("the payload no longer validates against job 't.echo'")
    assert jobs_core.STARTED == [(1, 1)]


async def test_an_unknown_type_is_never_imported_or_run(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    ghost = await conn.fetchval(
        "INSERT INTO batchloop.jobs (type, queue, payload, max_attempts, lease_seconds)"
        " VALUES ('ghost_module:run', 'core', '{}', 3, 60) RETURNING id"
    )
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        good = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1))
        await wait_for(lambda: jobs_core.status(conn, good), expect="completed")
    run = await jobs.get(conn, ghost)
    assert run is not None and (run.status, run.attempts) == ("pending", 0)
    assert "ghost_module" not in sys.modules


async def test_retention_deletes_finished_jobs_in_batches(
    conn: asyncpg.Connection, migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from batchloop.jobs import queue

    monkeypatch.setattr(queue, "SWEEP_BATCH", 100)
    await conn.execute(
        "INSERT INTO batchloop.jobs (type, queue, status, payload, max_attempts, lease_seconds,"
        " completed_at) SELECT 't.swept', 'swept', 'completed', '1', 1, 60,"
        " now() - interval '1 hour' FROM generate_series(1, 250)"
    )
    keep = await conn.fetchval(
        "INSERT INTO batchloop.jobs (type, queue, status, payload, max_attempts, lease_seconds,"
        " completed_at) VALUES ('t.echo', 'core', 'completed', '{}', 1, 60,"
        " now() - interval '1 hour') RETURNING id"
    )
    deletes: list[int] = []
    real = queue.Due

    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        with caplog_deletes(deletes):
            job_id = await jobs_core.swept.dispatch(conn, 1)
            await wait_for(
                lambda: conn.fetchval("SELECT count(*) FROM batchloop.jobs WHERE queue = 'swept'"),
                expect=0,
            )
    assert real is queue.Due
    assert await jobs.get(conn, job_id) is None  # swept too, once past its retention (0.5 s)
    assert await jobs.get(conn, keep) is not None  # another queue's, with the default retention
    assert sum(deletes) == 251 and max(deletes) <= 100 and len(deletes) >= 3


class caplog_deletes:
    """Collects the counts of the sweep's debug records ("deleted N finished jobs")."""

    def __init__(self, into: list[int]) -> None:
        self.into = into
        self.logger = logging.getLogger("batchloop")

    def __enter__(self) -> None:
        self.handler = _Collect(self.into)
        self.level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


class _Collect(logging.Handler):
    def __init__(self, into: list[int]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "job queue %r: deleted %d finished jobs":
            self.into.append(int(record.args[1]))  # type: ignore[index]


async def test_dispatch_many_returns_ids_in_order(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    ids = await jobs_core.echo.dispatch_many(
        conn, [jobs_core.Item(n=n) for n in range(5)], delay=3600
    )
    rows = await conn.fetch("SELECT id, (payload->>'n')::int AS n FROM batchloop.jobs")
    assert [r["n"] for r in sorted(rows, key=lambda r: ids.index(r["id"]))] == [0, 1, 2, 3, 4]
    assert await jobs_core.echo.dispatch_many(conn, []) == []
    listed = await jobs.list_jobs(conn, queue="core", status="pending", limit=3)
    assert [r.id for r in listed] == sorted(ids, reverse=True)[:3]
    assert await jobs.list_jobs(conn, type="t.gated") == []
    with pytest.raises(ValueError, match="status"):
        await jobs.list_jobs(conn, status="done")
    assert await jobs.cancel(conn, ids[0]) is True
    counts = await jobs.queue_counts(conn)
    assert counts == {
        "core": {"pending": 4, "running": 0, "completed": 0, "failed": 0, "canceled": 1}
    }
    assert await jobs.queue_counts(conn, queue="other") == {}


async def test_psycopg_connections_work_for_every_call(migrated_dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(migrated_dsn) as pconn:
        await pconn.execute(
            "CREATE TABLE completions (job_id bigint NOT NULL, status text NOT NULL,"
            " at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
        await pconn.commit()
        jobs_core.COMPLETED.clear()
        async with pconn.transaction():
            job_id = await jobs_core.echo.dispatch(pconn, {"n": 1}, key="p", delay=3600)
        assert await jobs_core.echo.dispatch(pconn, {"n": 1}, key="p") == job_id
        await pconn.commit()
        run = await jobs.get(pconn, job_id)
        assert run is not None and run.payload["n"] == 1
        assert [r.id for r in await jobs.list_jobs(pconn)] == [job_id]
        assert await jobs.cancel(pconn, job_id) is True
        assert await jobs.retry(pconn, job_id) is True
        await pconn.commit()
        plain = await jobs_core.swept.dispatch(pconn, 5)  # no on_complete: no transaction
        await pconn.commit()
        async with bl.Host(migrated_dsn, modules=["jobs_core"], driver="psycopg"):
            await conn_wait(pconn, job_id)
            await conn_wait(pconn, plain)
        assert [(job_id, "canceled"), (job_id, "completed")] == jobs_core.COMPLETED


async def conn_wait(pconn: psycopg.AsyncConnection[Any], job_id: int) -> None:
    async def done() -> bool:
        run = await jobs.get(pconn, job_id)
        await pconn.rollback()
        # A swept job may be gone already (its queue keeps finished jobs 0.5 s).
        return run is None or run.status == "completed"

    await wait_for(done)


async def test_an_expired_lease_on_the_last_attempt_fails_and_a_requested_cancel_ends(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    spent = await jobs_core.sticky.dispatch(conn, jobs_core.Item(n=1))
    dropped = await jobs_core.sticky.dispatch(conn, jobs_core.Item(n=2))
    # As if their host had died: attempt 3 of 3 for one, a cancel requested for the other.
    await conn.execute(
        "UPDATE batchloop.jobs SET status = 'running', lease_until = now() - interval '1 s',"
        " attempts = CASE WHEN id = $1 THEN 3 ELSE 1 END, cancel_requested = (id = $2)",
        spent,
        dropped,
    )
    async with bl.Host(migrated_dsn, modules=["jobs_core"]):
        await wait_for(lambda: jobs_core.status(conn, spent), expect="failed")
        await wait_for(lambda: jobs_core.status(conn, dropped), expect="canceled")
    run = await jobs.get(conn, spent)
    assert run is not None and run.attempts == 3
    assert run.error == (
        "lease expired on attempt 3 of 3 (its host died or stalled); no attempts left"
    )
    for job_id in (spent, dropped):  # neither ran again (a run would have set started_at)
        again = await jobs.get(conn, job_id)
        assert again is not None and again.started_at is None and again.progress == 0
    rows = await conn.fetch("SELECT job_id, status FROM completions ORDER BY job_id")
    assert [tuple(r) for r in rows] == [(spent, "failed"), (dropped, "canceled")]
