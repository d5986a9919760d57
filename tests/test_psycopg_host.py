"""Hosts whose loops hand psycopg connections to the user's callables (``driver="psycopg"``),
and misuse of the iteration's transaction by user code, on both drivers."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import psycopg
import psycopg_pool
import pytest

import batchloop as bl

import jobs
import psycopg_jobs
from helpers import count, wait_for

pytestmark = pytest.mark.anyio


async def _psycopg(dsn: str) -> psycopg.AsyncConnection[Any]:
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    await conn.execute(jobs.TABLES.encode())
    return conn


async def _one(conn: psycopg.AsyncConnection[Any], query: str, *args: Any) -> Any:
    cur = await conn.execute(query, args or None)
    row = await cur.fetchone()
    assert row is not None
    return row[0]


async def test_psycopg_host_drains_on_psycopg_connections(migrated_dsn: str) -> None:
    conn = await _psycopg(migrated_dsn)
    name = "pg-drain"
    k = psycopg_jobs.knobs(name)
    async with bl.Host(migrated_dsn, modules=["psycopg_jobs"], driver="psycopg") as host:
        assert isinstance(host.pool, psycopg_pool.AsyncConnectionPool)
        assert await psycopg_jobs.insert_and_ping(conn, name, 250) == "created"
        await wait_for(lambda: _one(conn, "SELECT count(*) FROM done"), expect=250)
        st = await wait_for(lambda: bl.status(conn, name), expect=lambda s: s.state == "idle")
        assert st.batches == 3 and st.consecutive_failures == 0
        assert k.conn_types == {psycopg.AsyncConnection}
        # every item exactly once, all by one generation; each savepoint was undone alone
        assert await _one(conn, "SELECT count(DISTINCT item_id) FROM done") == 250
        assert await _one(conn, "SELECT count(DISTINCT generation) FROM done") == 1
        assert await _one(conn, "SELECT count(*) FROM calls") == 0
        assert await _one(conn, "SELECT count(*) FROM items") == 0
        # pool connections carry the host's name, so another host can end them if it freezes
        apps = await _one(
            conn,
            "SELECT array_agg(DISTINCT application_name) FROM pg_stat_activity WHERE pid = ANY(%s)",
            list(set(k.pids)),
        )
        assert apps == [host.application_name]
        assert await psycopg_jobs.insert_and_ping(conn, name, 5) == "woken"
        await wait_for(lambda: _one(conn, "SELECT count(*) FROM done"), expect=255)
    await conn.close()


async def test_psycopg_work_connection_killed_mid_batch(migrated_dsn: str) -> None:
    """The batch on a terminated connection rolls back and is redone on a fresh one."""
    conn = await _psycopg(migrated_dsn)
    name = "pg-kill"
    k = psycopg_jobs.knobs(name)
    k.limit = 10
    k.gate = gate = asyncio.Event()
    async with bl.Host(migrated_dsn, modules=["psycopg_jobs"], driver="psycopg"):
        await psycopg_jobs.insert_and_ping(conn, name, 30)
        await wait_for(k.entered.is_set)
        victim = k.pids[-1]
        assert await _one(conn, "SELECT pg_terminate_backend(%s)", victim)
        k.gate = None
        gate.set()
        await wait_for(lambda: _one(conn, "SELECT count(*) FROM items"), expect=0)
        st = await wait_for(lambda: bl.status(conn, name), expect=lambda s: s.state == "idle")
        assert st.last_error is not None and st.consecutive_failures == 0
        assert await _one(conn, "SELECT count(*) FROM done") == 30
        assert await _one(conn, "SELECT count(DISTINCT item_id) FROM done") == 30
        assert victim not in k.pids[k.pids.index(victim) + 1 :]
    await conn.close()


async def test_psycopg_host_refuses_a_bad_dsn_and_a_bad_driver(migrated_dsn: str) -> None:
    bad = migrated_dsn.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(bl.BatchloopError, match="no_such_database_here"):
        async with bl.Host(bad, driver="psycopg", startup_timeout=5):
            pass
    with pytest.raises(ValueError, match="driver must be"):
        bl.Host(migrated_dsn, driver="psycopg2")  # type: ignore[arg-type]


async def _drive(
    driver: str,
    dsn: str,
    name: str,
    setup: Any,
    config: bl.Config | None = None,
    **host_options: Any,
) -> Any:
    """Drain 30 items of ``name`` with ``setup(knobs)`` applied; return the final status."""
    if driver == "psycopg":
        conn: Any = await _psycopg(dsn)
        setup(psycopg_jobs.knobs(name))
        ping = psycopg_jobs.insert_and_ping
    else:
        conn = await asyncpg.connect(dsn)
        await jobs.create_tables(conn)
        setup(jobs.knobs(name))
        ping = jobs.insert_and_ping
    try:
        async with bl.Host(
            dsn,
            modules=["jobs", "psycopg_jobs"],
            driver=driver,  # type: ignore[arg-type]
            **host_options,
        ):
            await ping(conn, name, 30, config=config)
            st = await wait_for(
                lambda: bl.status(conn, name), expect=lambda s: s.state == "idle", timeout=20
            )
        admin = await asyncpg.connect(dsn)
        try:
            done = await count(admin, "SELECT count(*) FROM done")
            distinct = await count(admin, "SELECT count(DISTINCT item_id) FROM done")
            left = await count(admin, "SELECT count(*) FROM items")
        finally:
            await admin.close()
        return st, done, distinct, left
    finally:
        await conn.close()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_caught_sql_error_fails_the_batch_instead_of_losing_it(
    migrated_dsn: str, driver: str
) -> None:
    """PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK and no error: the
    loop must notice, record a failure and redo the batch, not count it as done."""

    def setup(k: Any) -> None:
        k.limit = 10
        k.swallow_errors = 2

    st, done, distinct, left = await _drive(driver, migrated_dsn, f"swallow-{driver}", setup)
    assert "rolled back at COMMIT" in (st.last_error or "")
    assert (done, distinct, left) == (30, 30, 0)
    assert st.batches == 3 and st.consecutive_failures == 0


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_iteration_timeout_cuts_off_a_running_statement(
    migrated_dsn: str, driver: str
) -> None:
    """A batch stuck in a 30 s statement is rolled back after iteration_timeout and retried at
    once (well within the 20 s the test waits), and the server stops running the statement
    (psycopg closes a connection whose cancel request was itself interrupted; its backend would
    otherwise hold the name's row lock for the full 30 s)."""

    def setup(k: Any) -> None:
        k.limit = 10
        k.server_sleep = 30.0

    config = bl.Config(iteration_timeout=0.5)
    # One pool connection: ending the lost backend must not wait for a pool slot of its own.
    st, done, distinct, left = await _drive(
        driver, migrated_dsn, f"slow-{driver}", setup, config, pool_max_size=1
    )
    assert "TimeoutError" in (st.last_error or ""), st.last_error
    assert (done, distinct, left) == (30, 30, 0)
    admin = await asyncpg.connect(migrated_dsn)
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
    assert await count(admin, sleeping) == 0
    await admin.close()


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_a_callable_that_commits_is_reported(migrated_dsn: str, driver: str) -> None:
    def setup(k: Any) -> None:
        k.limit = 10
        k.commit_itself = 1

    st, done, distinct, left = await _drive(driver, migrated_dsn, f"commit-{driver}", setup)
    assert "ended the iteration's transaction" in (st.last_error or "")
    # its writes and the batch's bookkeeping committed together, by the callable's COMMIT
    assert (done, distinct, left) == (30, 30, 0)


async def test_psycopg_pool_gets_the_hosts_connect_kwargs(migrated_dsn: str) -> None:
    settings = {"search_path": "public, batchloop", "lock_timeout": "1234ms"}
    async with (
        bl.Host(
            migrated_dsn, driver="psycopg", connect_kwargs={"server_settings": settings}
        ) as host,
        host.pool.connection() as conn,
    ):
        cur = await conn.execute(
            "SELECT current_setting('search_path'), current_setting('lock_timeout')"
        )
        assert await cur.fetchone() == ("public, batchloop", "1234ms")
    with pytest.raises(ValueError, match="no psycopg equivalent"):
        bl.Host(migrated_dsn, driver="psycopg", connect_kwargs={"ssl": True})


async def test_a_name_that_defeats_inlining_still_runs(migrated_dsn: str) -> None:
    """Names are arbitrary text: one that cannot be dollar-quoted safely goes through the
    parameterised statements instead, on both kinds of iteration."""
    conn = await asyncpg.connect(migrated_dsn)
    await jobs.create_tables(conn)
    names = ["x$bl", "$bl$", "it's", "100%", "a$"]
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        for n in names:
            await jobs.insert_and_ping(conn, n, 5)
        await wait_for(lambda: count(conn, "SELECT count(*) FROM items"), expect=0)
        for n in names:
            st = await wait_for(lambda n=n: bl.status(conn, n), expect=lambda s: s.state == "idle")
            assert st.batches == 1 and st.last_error is None, (n, st.last_error)
    await conn.close()
