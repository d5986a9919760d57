"""The database itself failing over: a primary and a synchronous streaming standby, hosts on
one DSN naming both servers (``host=a,b``, ``target_session_attrs=read-write``).

The primary is killed (connections refused at once) or frozen (SIGSTOP of every process of the
server: the kernel still accepts connections and ACKs packets, nothing ever answers, as with a
frozen machine); the standby is promoted. The host must notice, give up on everything it had
on the old server within bounded time, reach the new primary by itself and process the whole
backlog there: nothing committed lost (synchronous replication) or processed twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import asyncpg
import pytest
from test_faults import Fleet, prepare

import batchloop as bl

from cluster import Cluster, make_cluster, make_standby
from helpers import wait_for
from invariants import assert_invariants
from jobs import create_tables, insert_and_ping

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture
def ha_pair() -> Iterator[tuple[Cluster, Cluster]]:
    primary = make_cluster({"track_commit_timestamp": "on"})
    try:
        standby = make_standby(primary)
        try:
            yield primary, standby
        finally:
            standby.destroy()
    finally:
        primary.destroy()  # thaws a frozen one first


@pytest.fixture
def ha_fleet(ha_pair: tuple[Cluster, Cluster], tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path, {"JOBS_LIMIT": "2", "JOBS_SLEEP": "0.02", "HOST_LOG_LEVEL": "INFO"})
    yield f
    f.close()  # before the clusters go


def both(primary: Cluster, standby: Cluster) -> str:
    return (
        f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/postgres"
        "?target_session_attrs=read-write"
    )


@pytest.mark.parametrize("fault", ["kill", "freeze"])
async def test_hosts_follow_the_promoted_standby(
    ha_pair: tuple[Cluster, Cluster], ha_fleet: Fleet, fault: str
) -> None:
    primary, standby = ha_pair
    lag = 3.0
    config = bl.Config(monitor_lag=lag)
    conn = await prepare(primary.dsn)
    host = await ha_fleet.start(both(primary, standby), JOBS_NAMES="h")
    await insert_and_ping(conn, "h", 300, config=config)
    await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), expect=lambda n: n >= 20)
    conn.terminate()  # the test's own connection would hang on a frozen server too
    t0 = time.monotonic()
    if fault == "kill":
        primary.kill()
    else:
        primary.freeze()
    standby.promote()
    new = await asyncpg.connect(standby.dsn, timeout=10)
    try:
        # More work, committed on the new primary only.
        await insert_and_ping(new, "h", 100, config=config)
        await wait_for(
            lambda: new.fetchval("SELECT count(*) FROM items"),
            expect=0,
            timeout=lag + 40,
            message="the backlog was not processed on the new primary",
        )
        took = time.monotonic() - t0
        print(f"\n{fault}: backlog done on the promoted standby {took:.1f} s after the fault")
        await assert_invariants(new, 400)
        assert host.alive()
        back = [ln for ln in host.warnings() if " is back: " in ln]
        assert back and f":{standby.port}" in back[-1], host.stderr()[-3000:]
        # Nothing was ended on the new server by a pid recorded on the old one.
        assert "backend(s) of its lost session" not in "".join(
            ln for ln in host.warnings() if "ended" in ln
        )
    finally:
        await new.close()


# --------------------------------------------------------------------------------------------
# Pieces of the failover, on the shared server


async def test_a_connection_dropped_at_begin_reports_its_own_error(migrated_dsn: str) -> None:
    """asyncpg releases a connection the server dropped back to its pool at once, so cleaning
    up after the failed BEGIN used to fail with "connection has been released back to the
    pool", hiding why the iteration failed. The BEGIN's booking is held up on a row lock while
    its backend is terminated, so the drop comes in the middle of it."""
    from batchloop.drivers.asyncpg import AsyncpgWork
    from batchloop.runtime.iteration import Transaction

    admin = await asyncpg.connect(migrated_dsn)
    await create_tables(admin)
    await insert_and_ping(admin, "b", 1)
    # as a claim would: the booking tests the owner with the generation
    await admin.execute("UPDATE batchloop.worker_state SET owner_host = 'me' WHERE name = 'b'")
    generation, revision = await admin.fetchrow(
        "SELECT s.generation, w.revision FROM batchloop.worker_state s"
        " JOIN batchloop.workers w USING (name) WHERE name = 'b'"
    )
    pool = await asyncpg.create_pool(migrated_dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            it = Transaction(
                AsyncpgWork(conn, "batchloop"), "batchloop", "b", generation, 1, "me", prepare=False
            )
            async with admin.transaction():
                await admin.execute(
                    "SELECT 1 FROM batchloop.worker_state WHERE name = 'b' FOR UPDATE"
                )
                failure: list[BaseException] = []

                async def begin() -> None:
                    try:
                        await it.begin(revision)
                    except Exception as exc:
                        failure.append(exc)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(begin)
                    await wait_for(
                        lambda: admin.fetchval(
                            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid
                        ),
                        expect="Lock",
                    )
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
        assert failure, "BEGIN did not fail"
        assert "released back to the pool" not in str(failure[0]), repr(failure[0])
        assert isinstance(
            failure[0],
            asyncpg.PostgresConnectionError
            | asyncpg.AdminShutdownError
            | asyncpg.ConnectionDoesNotExistError,
        ), repr(failure[0])
    finally:
        await admin.close()
        await pool.close()


async def test_psycopg_pool_hands_out_no_dead_connection(migrated_dsn: str) -> None:
    """After a failover every idle connection of the pool is dead: each must be checked
    before a loop gets it."""
    from batchloop.connect import create_psycopg_pool

    pool = await create_psycopg_pool(
        migrated_dsn, timeout=10, min_size=2, max_size=2, application_name="bl-ha-check"
    )
    admin = await asyncpg.connect(migrated_dsn)
    try:
        await wait_for(
            lambda: admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'bl-ha-check'"
            ),
            expect=2,
        )
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'bl-ha-check'"
        )
        for _ in range(2):
            async with pool.acquire() as conn:
                cur = await conn.execute("SELECT 1")
                assert await cur.fetchone() == (1,)
    finally:
        await admin.close()
        await pool.close()


async def test_zombies_are_ended_only_on_the_server_they_were_on(migrated_dsn: str) -> None:
    """A pid recorded on one server (identified by its postmaster's start time) is never
    terminated on another: there it may be any live backend."""
    from batchloop import sql
    from batchloop.connect import SERVER_ID

    victim = await asyncpg.connect(
        migrated_dsn, server_settings={"application_name": "bl-ha-zombie"}
    )
    admin = await asyncpg.connect(migrated_dsn)
    try:
        pid = victim.get_server_pid()
        query = sql.query("end_zombies", "batchloop")
        here = await admin.fetchval(SERVER_ID)
        assert await admin.fetchval(query, [pid], [], "bl-ha-zombie", "12345.6") == 0
        assert not victim.is_closed() and await victim.fetchval("SELECT 1") == 1
        assert await admin.fetchval(query, [pid], [], "bl-ha-zombie", here) == 1
    finally:
        await admin.close()
        victim.terminate()
