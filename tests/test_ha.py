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

import asyncpg
import pytest

import batchloop as bl

from cluster import Cluster, make_cluster, make_standby
from helpers import wait_for
from invariants import assert_invariants
from jobs import insert_and_ping
from test_faults import Fleet, prepare

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
