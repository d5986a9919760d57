"""Hosts whose loops hand psycopg connections to the user's callables (``driver="psycopg"``):
the host's side (pool, connection settings, refusals). The iteration and its misuse by user
code run over both drivers in test_driver_conformance.py."""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg_pool
import pytest

import batchloop as bl
from batchloop.testing import wait_idle

import jobs
import psycopg_jobs
from helpers import wait_for

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


@pytest.mark.batchloop_modules("psycopg_jobs", driver="psycopg")
async def test_psycopg_host_drains_on_psycopg_connections(
    batchloop_host: bl.Host, batchloop_dsn: str
) -> None:
    conn = await _psycopg(batchloop_dsn)
    name = "pg-drain"
    k = psycopg_jobs.knobs(name)
    host = batchloop_host
    assert isinstance(host.pool, psycopg_pool.AsyncConnectionPool)
    assert await psycopg_jobs.insert_and_ping(conn, name, 250) == "created"
    await wait_for(lambda: _one(conn, "SELECT count(*) FROM done"), expect=250)
    st = await wait_idle(conn, name)
    assert st.state == "idle" and st.batches == 3 and st.consecutive_failures == 0
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


async def test_psycopg_host_refuses_a_bad_dsn_and_a_bad_driver(migrated_dsn: str) -> None:
    bad = migrated_dsn.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(bl.BatchloopError, match="no_such_database_here"):
        async with bl.Host(bad, driver="psycopg", startup_timeout=5):
            pass
    with pytest.raises(ValueError, match="driver must be"):
        bl.Host(migrated_dsn, driver="psycopg2")  # type: ignore[arg-type]


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
