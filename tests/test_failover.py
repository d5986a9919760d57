"""Failover with real host processes and real signals (SIGKILL, SIGSTOP)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import batchloop as bl

from helpers import wait_for
from invariants import assert_invariants
from jobs import create_tables, insert_and_ping

pytestmark = pytest.mark.anyio
HERE = Path(__file__).parent


class Hosts:
    def __init__(self, dsn: str, env: dict[str, str]) -> None:
        self.dsn, self.env = dsn, env
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(self) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, str(HERE / "run_host.py"), self.dsn],
            cwd=HERE,
            env={**os.environ, **self.env, "PYTHONPATH": str(HERE)},
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready"), f"host process failed to start: {line!r}"
        self.procs.append(proc)
        return proc

    def by_pid(self, pid: int) -> subprocess.Popen[str]:
        return next(p for p in self.procs if p.pid == pid)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
            p.wait(10)


@pytest.fixture
def hosts(migrated_dsn: str) -> Iterator[Hosts]:
    h = Hosts(migrated_dsn, {"JOBS_LIMIT": "1", "JOBS_SLEEP": "0.02", "JOBS_NAMES": "f"})
    yield h
    h.close()


async def _owner_pid(conn: Any, name: str) -> int | None:
    st = await bl.status(conn, name)
    return st.owner.pid if st and st.owner else None


async def _setup(dsn: str, items: int, config: bl.Config | None = None) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await create_tables(conn)
    await insert_and_ping(conn, "f", items, config=config)
    return conn


async def test_sigkill_of_owner_is_taken_over_within_a_second(
    migrated_dsn: str, hosts: Hosts
) -> None:
    for _ in range(3):
        hosts.spawn()
    conn = await _setup(migrated_dsn, 400)
    gaps = []
    for _ in range(2):
        pid = await wait_for(lambda: _owner_pid(conn, "f"))
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), expect=lambda n: n > 0)
        old_gen = await conn.fetchval("SELECT max(generation) FROM done")
        hosts.by_pid(pid).send_signal(signal.SIGKILL)
        t0 = await conn.fetchval("SELECT clock_timestamp()")
        first = await wait_for(
            functools.partial(
                conn.fetchval, "SELECT min(finished) FROM done WHERE generation > $1", old_gen
            ),
            timeout=10,
        )
        gaps.append((first - t0).total_seconds())
        new_pid = await wait_for(lambda: _owner_pid(conn, "f"))
        assert new_pid != pid
    print(f"takeover gaps after SIGKILL (s): {gaps}")
    assert max(gaps) < 1.0, f"takeover gaps after SIGKILL: {gaps}"
    await wait_for(lambda: conn.fetchval("SELECT count(*) FROM items"), expect=0, timeout=60)
    await assert_invariants(conn, 400)
    await conn.close()


async def test_frozen_owner_is_fenced_and_taken_over_after_monitor_lag(
    migrated_dsn: str, hosts: Hosts
) -> None:
    hosts.spawn()
    hosts.spawn()
    lag = 3.0
    conn = await _setup(migrated_dsn, 300, bl.Config(monitor_lag=lag))
    pid = await wait_for(lambda: _owner_pid(conn, "f"))
    await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), expect=lambda n: n > 0)
    old_gen = await conn.fetchval("SELECT max(generation) FROM done")
    frozen = hosts.by_pid(pid)
    frozen.send_signal(signal.SIGSTOP)
    t0 = await conn.fetchval("SELECT clock_timestamp()")
    first = await wait_for(
        lambda: conn.fetchval("SELECT min(finished) FROM done WHERE generation > $1", old_gen),
        timeout=lag + 10,
    )
    gap = (first - t0).total_seconds()
    print(f"frozen owner taken over after {gap:.2f} s (monitor_lag {lag} s)")
    assert gap < lag + 3.0, f"frozen owner taken over after {gap:.2f}s (monitor_lag {lag})"
    frozen.send_signal(signal.SIGCONT)
    await wait_for(lambda: conn.fetchval("SELECT count(*) FROM items"), expect=0, timeout=60)
    late = await conn.fetchval(
        "SELECT count(*) FROM done WHERE generation <= $1 AND finished > $2", old_gen, first
    )
    assert late == 0, "the resumed process committed with its old generation"
    await assert_invariants(conn, 300)
    await conn.close()
