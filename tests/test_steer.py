"""Issue 11, items 1-3: status that tells the truth (owner_alive, stale, ping "stopped",
relative times), steering (wake, Config.max_failures, list_hosts) and health (Host.health,
``batchloop health``)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import batchloop as bl
import batchloop.sync as bls
from batchloop.calls import health_problems
from batchloop.display import format_status_table, relative

from helpers import count, wait_for
from jobs import create_tables, insert_and_ping, knobs, next_items, process_items

pytestmark = pytest.mark.anyio
TESTS = Path(__file__).parent


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "batchloop", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


async def _setup(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await create_tables(conn)
    return conn


async def _status(conn: Any, name: str) -> bl.WorkerStatus:
    st = await bl.status(conn, name)
    assert st is not None
    return st


# ------------------------------------------------------------------ 1. status tells the truth


async def test_running_without_a_host_is_stale_everywhere(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        await insert_and_ping(conn, "orphan", 1)
        st = await _status(conn, "orphan")
        assert st.state == "running" and st.stale and not st.owner_alive and st.owner is None
        table = format_status_table([st])
        assert "running (no host)" in table
        out = cli("--dsn", migrated_dsn, "status")
        assert out.returncode == 0, out.stderr
        assert "running (no host)" in out.stdout
        js = json.loads(cli("--dsn", migrated_dsn, "status", "orphan", "--json").stdout)
        assert js["stale"] is True and js["owner_alive"] is False

        knobs("held").gate = gate = asyncio.Event()
        await insert_and_ping(conn, "held", 1)
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await wait_for(lambda: knobs("held").entered.is_set(), 20)
            st = await _status(conn, "held")
            assert st.owner_alive and not st.stale and st.owner is not None
            assert "(no host)" not in format_status_table([st])
            gate.set()
    finally:
        await conn.close()


async def test_a_main_module_name_no_host_can_run_shows_stale(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        await insert_and_ping(conn, "script", 1)
        await conn.execute(
            "UPDATE batchloop.workers SET worker = '__main__:process' WHERE name = 'script'"
        )
        async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
            await wait_for(lambda: host.health().heartbeat_age is not None, 20)
            st = await _status(conn, "script")
            assert st.state == "running" and st.stale and not st.owner_alive
    finally:
        await conn.close()


async def test_ping_says_stopped_for_a_stopped_worker(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        assert await insert_and_ping(conn, "halted", 1) == "created"
        assert await bl.stop(conn, "halted")
        assert await insert_and_ping(conn, "halted", 1) == "stopped"
        assert (await _status(conn, "halted")).stale is False  # stopped is not waiting for a host
    finally:
        await conn.close()


def test_relative_times() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert relative(now + timedelta(seconds=4.2), now) == "in 4 s"
    assert relative(now - timedelta(seconds=12), now) == "12 s ago"
    assert relative(now - timedelta(minutes=5, seconds=3), now) == "5 min ago"
    assert relative(now + timedelta(hours=3), now) == "in 3 h"
    assert relative(now - timedelta(days=2), now) == "2 d ago"
    assert relative(now + timedelta(milliseconds=300), now) == "now"
    assert relative(None, now) == "-"


# ------------------------------------------------------------------------------- 2. steering


async def test_wake_unknown_stopped_and_idle(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        assert await bl.wake(conn, "nobody") is False
        await insert_and_ping(conn, "w1", 0)
        await conn.execute("UPDATE batchloop.workers SET status = 'idle' WHERE name = 'w1'")
        assert await bl.wake(conn, "w1") is True
        st = await _status(conn, "w1")
        assert st.state == "running" and st.next_run_at is not None
        assert await bl.stop(conn, "w1")
        assert await bl.wake(conn, "w1") is False
        assert (await _status(conn, "w1")).state == "stopped"
        with pytest.raises(ValueError):
            await bl.wake(conn, "")
    finally:
        await conn.close()


async def test_wake_cuts_a_running_loops_debounce_short(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        knobs("deb").debounce = 3600.0  # without a wake, the next batch is an hour away
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await insert_and_ping(conn, "deb", 1)
            await wait_for(lambda: count(conn, "SELECT count(*) FROM done"), 20, expect=1)
            await wait_for(lambda: _next_run_in(conn, "deb"), 20, expect=lambda s: s > 3000)
            await insert_and_ping(conn, "deb", 1)  # ignored: running, debounced
            assert await bl.wake(conn, "deb") is True
            await wait_for(lambda: count(conn, "SELECT count(*) FROM done"), 20, expect=2)
    finally:
        await conn.close()


async def test_wake_cuts_a_failure_backoff_short(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        k = knobs("flaky")
        k.fail_times = 1
        # Many failures already (a claim loads the count): the next backoff is half an hour
        # or more, capped by monitor_lag.
        await insert_and_ping(conn, "flaky", 1, config=bl.Config(monitor_lag=3600))
        await conn.execute(
            "UPDATE batchloop.worker_state SET consecutive_failures = 20 WHERE name = 'flaky'"
        )
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await wait_for(lambda: _failures(conn, "flaky"), 20, expect=21)
            assert await _next_run_in(conn, "flaky") > 1000
            assert await bl.wake(conn, "flaky") is True  # the sleeping loop re-arms
            await wait_for(lambda: count(conn, "SELECT count(*) FROM done"), 20, expect=1)
            assert await _failures(conn, "flaky") == 0
    finally:
        await conn.close()


def test_wake_sync_and_cli(migrated_dsn: str) -> None:
    import psycopg

    with psycopg.connect(migrated_dsn, autocommit=True) as conn:
        bls.ping(conn, "s1", next_items, process_items)
        assert bls.wake(conn, "s1") is True
        assert bls.wake(conn, "missing") is False
    out = cli("--dsn", migrated_dsn, "wake", "s1")
    assert out.returncode == 0, out.stderr
    assert "woke 's1'" in out.stdout and "no host" in out.stdout
    out = cli("--dsn", migrated_dsn, "wake", "missing")
    assert out.returncode == 1 and "no worker named 'missing'" in out.stderr
    assert cli("--dsn", migrated_dsn, "stop", "s1").returncode == 0
    out = cli("--dsn", migrated_dsn, "wake", "s1")
    assert out.returncode == 1 and "is stopped" in out.stderr and "start s1" in out.stderr


async def test_max_failures_stops_a_poison_batch_and_start_resumes(
    migrated_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = await _setup(migrated_dsn)
    caplog.set_level(logging.ERROR, logger="batchloop")
    try:
        k = knobs("poison")
        k.fail_times = 1_000
        config = bl.Config(max_failures=3)
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            await insert_and_ping(conn, "poison", 1, config=config)
            st = await wait_for(
                lambda: _status(conn, "poison"), 30, expect=lambda s: s.state == "stopped"
            )
            assert st.consecutive_failures == 3
            assert st.last_error is not None and "injected failure" in st.last_error
            assert not st.stale
            # the loop logs once record_failure returns, which may be after we read the status
            await wait_for(
                lambda: any(
                    "stopped after 3 consecutive failures" in r.getMessage() for r in caplog.records
                )
            )
            assert await count(conn, "SELECT count(*) FROM done") == 0
            k.fail_times = 0
            assert await bl.start(conn, "poison")
            await wait_for(lambda: count(conn, "SELECT count(*) FROM done"), 20, expect=1)
            assert (await _status(conn, "poison")).consecutive_failures == 0
    finally:
        await conn.close()


async def test_a_superseded_loop_can_neither_count_nor_stop(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        await insert_and_ping(conn, "fenced", 1, config=bl.Config(max_failures=1))
        gen = (await _status(conn, "fenced")).generation
        await conn.execute(
            "UPDATE batchloop.worker_state SET generation = generation + 1 WHERE name = 'fenced'"
        )
        rows = await conn.fetch(
            "SELECT * FROM batchloop.record_failure('fenced', $1, 'old', 1.0)", gen
        )
        assert rows == []
        st = await _status(conn, "fenced")
        assert st.state == "running" and st.consecutive_failures == 0
        rows = await conn.fetch(
            "SELECT * FROM batchloop.record_failure('fenced', $1, 'now', 1.0)", gen + 1
        )
        assert [tuple(r) for r in rows] == [(1, True)]
        st = await _status(conn, "fenced")
        assert st.state == "stopped" and st.generation == gen + 2 and st.last_error == "now"
    finally:
        await conn.close()


def test_max_failures_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_failures"):
        bl.Config(max_failures=0)
    assert bl.Config().max_failures is None


async def test_list_hosts_and_cli_hosts(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    try:
        assert await bl.list_hosts(conn) == []
        await conn.execute(
            "INSERT INTO batchloop.hosts (host_id, hostname, pid, heartbeat_at) "
            "VALUES ('deadbeef', 'gone', 1, now() - interval '1 hour')"
        )
        knobs("owned").gate = gate = asyncio.Event()
        await insert_and_ping(conn, "owned", 1)
        async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
            await wait_for(lambda: knobs("owned").entered.is_set(), 20)
            hosts = {h.host_id: h for h in await bl.list_hosts(conn)}
            assert set(hosts) == {"deadbeef", host.host_id}
            assert hosts["deadbeef"].alive is False and hosts["deadbeef"].owned == []
            me = hosts[host.host_id]
            assert me.alive and me.owned == ["owned"] and me.pid == os.getpid()
            out = cli("--dsn", migrated_dsn, "hosts", "--json")
            assert out.returncode == 0, out.stderr
            listed = {h["host_id"]: h for h in json.loads(out.stdout)}
            assert listed[host.host_id]["owned"] == ["owned"]
            assert listed["deadbeef"]["alive"] is False
            table = cli("--dsn", migrated_dsn, "hosts").stdout
            assert host.host_id in table and "yes" in table and "ago" in table
            gate.set()
    finally:
        await conn.close()


# --------------------------------------------------------------------------------- 3. health


async def test_host_health(migrated_dsn: str) -> None:
    host = bl.Host(migrated_dsn, modules=["jobs"], heartbeat_interval=0.2)
    before = host.health()
    assert not before.ok and not before.connected and before.problems
    async with host:
        h = await wait_for(host.health, 20, expect=lambda h: h.heartbeat_age is not None)
        assert h.ok and h.connected and h.problems == [] and h.heartbeat_age < 10
    after = host.health()
    assert not after.ok and not after.connected


async def test_cli_health(migrated_dsn: str) -> None:
    out = cli("--dsn", migrated_dsn, "health")
    assert out.returncode == 1 and "no live host" in out.stdout
    conn = await _setup(migrated_dsn)
    try:
        async with bl.Host(migrated_dsn, modules=["jobs"]):
            out = cli("--dsn", migrated_dsn, "health")
            assert out.returncode == 0, out.stdout + out.stderr
            knobs("sick").fail_times = 1_000
            await insert_and_ping(conn, "sick", 1)
            await wait_for(lambda: _failures(conn, "sick"), 20, expect=lambda n: n >= 1)
            out = cli("--dsn", migrated_dsn, "health", "--json")
            assert out.returncode == 1
            report = json.loads(out.stdout)
            assert report["ok"] is False and any("'sick'" in p for p in report["problems"])
            await wait_for(lambda: _failures(conn, "sick"), 20, expect=lambda n: n >= 2)
            assert cli("--dsn", migrated_dsn, "health", "--max-failures", "1000").returncode == 0
            await bl.stop(conn, "sick")
    finally:
        await conn.close()
    out = cli("--dsn", migrated_dsn, "--schema", "elsewhere", "health")  # no such schema
    assert out.returncode == 1 and "batchloop migrate" in out.stdout
    out = cli("--dsn", "postgresql://root@127.0.0.1:1/nowhere?connect_timeout=2", "health")
    assert out.returncode == 1 and out.stdout.startswith("database unavailable")


def test_health_problems_decision() -> None:
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    host = bl.HostStatus(
        host_id="h", hostname="x", pid=1, started_at=now, heartbeat_at=now, alive=True
    )

    def worker(**kw: Any) -> bl.WorkerStatus:
        base: dict[str, Any] = dict(
            name="n", state="running", generation=1, owner=None, work_query="m:q",
            worker="m:w", config=bl.Config(monitor_lag=10), last_work_at=None,
            next_run_at=now, batches=0, consecutive_failures=0, last_error=None,
        )  # fmt: skip
        return bl.WorkerStatus(**{**base, **kw})

    assert health_problems([host], [worker()], 1, now) == []
    assert health_problems([], [], 1, now) == [
        "no live host: start one with `batchloop run MODULE...`"
    ]
    fresh = worker(stale=True, next_run_at=now - timedelta(seconds=5))
    assert health_problems([host], [fresh], 1, now) == []  # a monitor claims it soon
    old = worker(stale=True, next_run_at=now - timedelta(seconds=30))
    assert "no host holds it for 30 s" in health_problems([host], [old], 1, now)[0]
    failing = worker(consecutive_failures=2, last_error="boom")
    assert "2 consecutive failures: boom" in health_problems([host], [failing], 2, now)[0]
    assert health_problems([host], [failing], 3, now) == []


async def _next_run_in(conn: Any, name: str) -> float:
    value = await conn.fetchval(
        "SELECT extract(epoch FROM next_run_at - now())::float8 "
        "FROM batchloop.worker_state WHERE name = $1",
        name,
    )
    return float(value or 0.0)


async def _failures(conn: Any, name: str) -> int:
    return int(
        await conn.fetchval(
            "SELECT consecutive_failures FROM batchloop.worker_state WHERE name = $1", name
        )
    )
