"""batchloop.jobs across hosts: the concurrency limit holds cluster-wide (one loop per queue),
and a host SIGKILLed mid-job has its job run again elsewhere once the lease expires."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import jobs_core
import pytest

import batchloop as bl
import batchloop.jobs as jobs

from helpers import wait_for

pytestmark = pytest.mark.anyio
HERE = Path(__file__).parent


@pytest.fixture
async def conn(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    c = await jobs_core.connect_fresh(migrated_dsn)
    try:
        yield c
    finally:
        await c.close()


async def test_the_concurrency_limit_holds_across_two_hosts(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    items = [jobs_core.Item(n=n, sleep=0.15) for n in range(18)]
    ids = await jobs_core.limited.dispatch_many(conn, items)
    live: list[int] = []

    watcher = await asyncpg.connect(migrated_dsn)  # the test body uses conn meanwhile

    async def sample() -> None:
        while True:
            live.append(
                await watcher.fetchval(
                    "SELECT count(*) FROM batchloop.jobs WHERE queue = 'limited'"
                    " AND status = 'running' AND lease_until > now()"
                )
            )
            await asyncio.sleep(0.01)

    hosts = [bl.Host(migrated_dsn, modules=["jobs_core"]) for _ in range(2)]
    for host in hosts:
        await host.__aenter__()
    sampler = asyncio.ensure_future(sample())
    try:
        name = jobs.queue_name("limited")
        await wait_for(lambda: any(name in h.owned() for h in hosts))
        await wait_for(lambda: len(jobs_core.HOSTS) >= 4)
        # The owner leaves while its handlers run; the other host takes the queue over and
        # must count their leases, which still hold slots.
        first = next(h for h in hosts if name in h.owned())
        second = next(h for h in hosts if h is not first)
        leaving = asyncio.ensure_future(first.__aexit__(None, None, None))
        await wait_for(lambda: name in second.owned())
        await leaving
        hosts.remove(first)
        done = await wait_for(
            lambda: conn.fetchval(
                "SELECT count(*) FROM batchloop.jobs WHERE status = 'completed' AND id = ANY($1)",
                ids,
            ),
            expect=len(ids),
            timeout=30,
        )
        assert done == len(ids)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await watcher.close()
        for host in hosts:
            await host.__aexit__(None, None, None)
    assert jobs_core.RUNNING["max"] == 3  # reached, never exceeded
    assert max(live) <= 3
    assert {h for h in jobs_core.HOSTS} == {first.host_id, second.host_id}
    assert await conn.fetchval("SELECT count(*) FROM completions") == len(ids)


def _spawn_host(dsn: str, **env: str) -> subprocess.Popen[str]:
    """A host process (tests/jobs_proc.py) with ``env`` (JOBS_BLOCK, JOBS_MODULES)."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "jobs_proc.py"), dsn],
        cwd=HERE,
        env={**os.environ, **env, "PYTHONPATH": str(HERE)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), f"host process failed to start: {line!r}"
    return proc


async def test_a_job_whose_host_is_killed_runs_again_elsewhere(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    proc = _spawn_host(migrated_dsn, JOBS_BLOCK="1")  # its t.sticky handlers never return
    try:
        job_id = await jobs_core.sticky.dispatch(conn, jobs_core.Item(n=1))
        await wait_for(lambda: jobs.get(conn, job_id), expect=lambda r: r and r.progress == 10)
        proc.kill()
        proc.wait(10)
        run = await jobs.get(conn, job_id)
        assert run is not None and (run.status, run.attempts) == ("running", 1)
        async with bl.Host(migrated_dsn, modules=["jobs_core"]):
            await wait_for(
                lambda: jobs.get(conn, job_id),
                expect=lambda r: r and r.status == "completed",
                timeout=15,
            )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    run = await jobs.get(conn, job_id)
    assert run is not None and run.attempts == 2
    assert run.result == {"n": 1, "pid": os.getpid()}
    rows = await conn.fetch("SELECT job_id, status FROM completions")
    assert [tuple(r) for r in rows] == [(job_id, "completed")]  # on_complete exactly once


async def test_a_host_without_the_queues_job_types_leaves_the_queue_alone(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    proc = _spawn_host(migrated_dsn, JOBS_MODULES="")  # batchloop.jobs, but no job type
    try:
        job_id = await jobs_core.echo.dispatch(conn, jobs_core.Item(n=1))
        beat = "SELECT heartbeat_at FROM batchloop.hosts WHERE pid = $1"
        first = await conn.fetchval(beat, proc.pid)
        # Two heartbeats later its monitor has looked at the orphaned queue a few times.
        await wait_for(lambda: conn.fetchval(beat, proc.pid), expect=lambda t: t > first)
        second = await conn.fetchval(beat, proc.pid)
        await wait_for(lambda: conn.fetchval(beat, proc.pid), expect=lambda t: t > second)
        st = await bl.status(conn, jobs.queue_name("core"))
        assert st is not None and st.owner is None and st.last_error is None and st.stale
        async with bl.Host(migrated_dsn, modules=["jobs_core"]):
            await wait_for(lambda: jobs.get(conn, job_id), expect=lambda r: r.status == "completed")
            after = await bl.status(conn, jobs.queue_name("core"))
            assert after is not None and after.last_error is None
            assert after.owner is None or after.owner.pid == os.getpid()
    finally:
        proc.kill()
        proc.wait(10)


async def test_jobs_finish_once_each_when_the_hosts_connections_are_cut_mid_run(
    conn: asyncpg.Connection, migrated_dsn: str
) -> None:
    items = [jobs_core.Item(n=n, sleep=0.1) for n in range(60)]  # 10 at a time: 0.6 s
    ids = await jobs_core.echo.dispatch_many(conn, items)
    done = "SELECT count(*) FROM batchloop.jobs WHERE id = ANY($1) AND status = 'completed'"
    # A host process: its reconnections are its own business, not this test's event loop's.
    proc = _spawn_host(migrated_dsn)
    try:
        await wait_for(lambda: conn.fetchval(done, ids), expect=lambda n: n >= 10)
        # Every backend of the host (pool and control): flushes, leases and the loop fail.
        cut = await conn.fetchval(
            "SELECT count(pg_terminate_backend(a.pid)) FROM pg_stat_activity a"
            " JOIN batchloop.hosts h ON a.application_name = 'batchloop/' || h.host_id"
            " WHERE h.pid = $1",
            proc.pid,
        )
        assert cut >= 2
        assert await conn.fetchval(done, ids) < len(ids)  # mid-run
        await wait_for(lambda: conn.fetchval(done, ids), expect=len(ids), timeout=30)
    finally:
        proc.kill()
        proc.wait(10)
    rows = await conn.fetch("SELECT job_id, count(*) AS n FROM completions GROUP BY job_id")
    assert sorted(r["job_id"] for r in rows) == sorted(ids)
    assert {r["n"] for r in rows} == {1}  # on_complete once per job, whatever was cut


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_the_loop_records_finished_attempts_with_its_next_lease(
    conn: asyncpg.Connection, migrated_dsn: str, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    from batchloop.jobs import runner

    async def no_flusher(self: runner.Runtime) -> None:
        await asyncio.Event().wait()  # only the queue's loop records completions now

    monkeypatch.setattr(runner.Runtime, "_flush_forever", no_flusher)
    ids = await jobs_core.limited.dispatch_many(
        conn, [jobs_core.Item(n=n, sleep=0.05) for n in range(12)]
    )
    watcher = await asyncpg.connect(migrated_dsn)
    live: list[int] = []

    async def sample() -> None:
        while True:
            live.append(
                await watcher.fetchval(
                    "SELECT count(*) FROM batchloop.jobs WHERE queue = 'limited'"
                    " AND status = 'running'"
                )
            )
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(sample())
    try:
        async with bl.Host(migrated_dsn, modules=["jobs_core"], driver=driver):
            await wait_for(
                lambda: conn.fetchval(
                    "SELECT count(*) FROM batchloop.jobs WHERE id = ANY($1)"
                    " AND status = 'completed'",
                    ids,
                ),
                expect=len(ids),
                timeout=30,
            )
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await watcher.close()
    # Each lease of freed slots committed with the completions that freed them: the table
    # never showed more than the 3 running that the queue allows.
    assert live and max(live) <= 3
    assert jobs_core.RUNNING["max"] == 3
    rows = await conn.fetch("SELECT job_id, count(*) AS n FROM completions GROUP BY job_id")
    assert sorted(r["job_id"] for r in rows) == sorted(ids) and {r["n"] for r in rows} == {1}
