"""Code older than the database schema refuses to run against it, at every entry point.

A newer release's ``migrate`` leaves its record in ``schema_migrations``; every call of this
code then raises SchemaTooNewError before it writes anything (and so does the CLI, as a
one-line error), whether or not ``schema_version()`` was rewritten too.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest

import batchloop as bl
import batchloop.sync as bls
from batchloop.migrations import code_version, plan
from batchloop.plans import Query, Script, Step, run_blocking

from helpers import wait_for
from jobs import TABLES, next_items, process_items

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
NEWER = code_version() + 1

# Everything an entry point could write: batchloop's tables and the test job's.
SNAPSHOT = """
SELECT (SELECT array_agg(w::text ORDER BY name) FROM batchloop.workers w),
       (SELECT array_agg(s::text ORDER BY name) FROM batchloop.worker_state s),
       (SELECT array_agg(h::text ORDER BY host_id) FROM batchloop.hosts h),
       (SELECT array_agg(m::text ORDER BY version) FROM batchloop.schema_migrations m),
       (SELECT count(*) FROM done), (SELECT count(*) FROM calls)
"""


def _cli(dsn: str, *args: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "batchloop", "--dsn", dsn, *args],
        capture_output=True,
        text=True,
        cwd=TESTS,  # MODULE (jobs) is imported from the current directory
        timeout=60,
    )
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"version {NEWER}, newer than" in lines[0] and "upgrade batchloop" in lines[0]
    raise bl.SchemaTooNewError(lines[0])  # what the caller of the CLI got


async def _with_asyncpg(dsn: str, call: Callable[[asyncpg.Connection], Awaitable[Any]]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await call(conn)
    finally:
        await conn.close()


async def _with_psycopg(dsn: str, call: Callable[[Any], Awaitable[Any]]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await call(conn)


def _with_sync(dsn: str, call: Callable[[psycopg.Connection[Any]], Any]) -> None:
    with psycopg.connect(dsn) as conn:  # commits at the end of the block, if it gets there
        call(conn)


async def _host(dsn: str, **kwargs: Any) -> None:
    async with bl.Host(dsn, modules=["jobs"], startup_timeout=10.0, **kwargs):
        pass


ENTRY_POINTS: dict[str, Callable[[str], Any]] = {
    "ping": lambda d: _with_asyncpg(d, lambda c: bl.ping(c, "new", next_items, process_items)),
    "ping-existing": lambda d: _with_asyncpg(
        d, lambda c: bl.ping(c, "w", next_items, process_items, config=bl.Config(debounce=3))
    ),
    "ping-psycopg": lambda d: _with_psycopg(
        d, lambda c: bl.ping(c, "new", next_items, process_items)
    ),
    "stop": lambda d: _with_asyncpg(d, lambda c: bl.stop(c, "w")),
    "start": lambda d: _with_asyncpg(d, lambda c: bl.start(c, "w")),
    "status": lambda d: _with_asyncpg(d, lambda c: bl.status(c, "w")),
    "list_workers": lambda d: _with_asyncpg(d, bl.list_workers),
    "migrate": lambda d: bl.migrate(d),
    "host": _host,
    "host-psycopg": lambda d: _host(d, driver="psycopg"),
    "tick": lambda d: bl.tick(d, budget=5.0),
    "sync.ping": lambda d: _with_sync(d, lambda c: bls.ping(c, "new", next_items, process_items)),
    "sync.stop": lambda d: _with_sync(d, lambda c: bls.stop(c, "w")),
    "sync.start": lambda d: _with_sync(d, lambda c: bls.start(c, "w")),
    "sync.status": lambda d: _with_sync(d, lambda c: bls.status(c, "w")),
    "sync.list_workers": lambda d: _with_sync(d, bls.list_workers),
    "sync.migrate": bls.migrate,
    "cli migrate": lambda d: _cli(d, "migrate"),
    "cli status": lambda d: _cli(d, "status"),
    "cli status NAME": lambda d: _cli(d, "status", "w"),
    "cli stop": lambda d: _cli(d, "stop", "w"),
    "cli start": lambda d: _cli(d, "start", "w"),
    "cli run": lambda d: _cli(d, "run", "jobs"),
    "cli tick": lambda d: _cli(d, "tick", "jobs", "--budget", "5"),
}


async def _prepare(dsn: str) -> asyncpg.Connection:
    """A running worker "w" with work waiting (so any host or tick would process it)."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(TABLES)
    async with conn.transaction():
        await conn.execute("INSERT INTO items (name) SELECT 'w' FROM generate_series(1, 5)")
        assert await bl.ping(conn, "w", next_items, process_items) == "created"
    return conn


@pytest.mark.parametrize("how", ["record", "record and function"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
async def test_every_entry_point_refuses_a_newer_schema(
    migrated_dsn: str, entry: str, how: str
) -> None:
    conn = await _prepare(migrated_dsn)
    # What a newer release's migrate leaves behind: its record, and maybe schema_version().
    await conn.execute(f"INSERT INTO batchloop.schema_migrations VALUES ({NEWER}, 'future')")
    if how == "record and function":
        await conn.execute(
            "CREATE OR REPLACE FUNCTION batchloop.schema_version() RETURNS integer "
            f"LANGUAGE sql IMMUTABLE AS 'SELECT {NEWER}'"
        )
    before = await conn.fetchrow(SNAPSHOT)
    with pytest.raises(bl.SchemaTooNewError, match=f"version {NEWER}, newer than"):
        result = ENTRY_POINTS[entry](migrated_dsn)
        if inspect.isawaitable(result):
            await result
    assert await conn.fetchrow(SNAPSHOT) == before
    await conn.close()


async def test_the_entry_points_run_on_an_up_to_date_schema(migrated_dsn: str) -> None:
    """The checks above refuse only a newer schema (the same calls, minus the CLI's)."""
    conn = await _prepare(migrated_dsn)
    for entry, call in ENTRY_POINTS.items():
        if entry.startswith("cli"):
            continue
        result = call(migrated_dsn)
        if inspect.isawaitable(result):
            await result
    assert await conn.fetchval("SELECT count(*) FROM batchloop.workers") == 2  # "w" and "new"
    await conn.close()


async def test_host_refuses_a_newer_schema_when_it_reconnects(
    migrated_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A newer release migrated while this host ran: its next control session refuses."""
    caplog.set_level(logging.INFO, logger="batchloop")
    conn = await _prepare(migrated_dsn)
    async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM done"), expect=5)
        await conn.execute(f"INSERT INTO batchloop.schema_migrations VALUES ({NEWER}, 'future')")
        control = host._current.control
        assert control is not None
        await conn.execute("SELECT pg_terminate_backend($1)", control.pid)

        def refused() -> bool:
            return any(
                isinstance(r.exc_info[1] if r.exc_info else None, bl.SchemaTooNewError)
                for r in caplog.records
            )

        await wait_for(refused, message="the host refused its new control session")
        before = await conn.fetchrow(SNAPSHOT)
    after = await conn.fetchrow(SNAPSHOT)
    assert after == before  # no more heartbeats, registrations or claims once refused
    await conn.close()


# ------------------------------------------------------------------ the plan's decisions


def _steps(replies: dict[str, list[dict[str, Any]]]) -> tuple[list[Step], list[int] | None]:
    """Drive the plan with canned query replies; the steps it asked for and its result."""
    steps = plan("batchloop")
    seen: list[Step] = []
    reply: list[dict[str, Any]] | None = None
    try:
        while True:
            step = steps.send(reply)
            seen.append(step)
            reply = replies[step.name] if isinstance(step, Query) else None
    except StopIteration as done:
        return seen, done.value


def _applied(*versions: int) -> list[dict[str, Any]]:
    return [{"version": v} for v in versions]


def test_plan_only_reads_when_up_to_date() -> None:
    up_to_date = _applied(*range(1, code_version() + 1))
    seen, done = _steps(
        {"migrations_readable": [{"exists": True}], "applied_migrations": up_to_date}
    )
    assert done == [] and not any(isinstance(s, Script) for s in seen)


def test_plan_refuses_a_newer_record_before_writing() -> None:
    replies = {"migrations_readable": [{"exists": True}], "applied_migrations": _applied(1, NEWER)}
    with pytest.raises(bl.SchemaTooNewError, match=f"version {NEWER}, newer than"):
        _steps(replies)


@pytest.mark.parametrize("readable", [False, True])
def test_plan_migrates_what_is_missing_under_the_lock(readable: bool) -> None:
    replies = {"migrations_readable": [{"exists": readable}], "applied_migrations": _applied(1)}
    seen, done = _steps(replies)
    assert done == list(range(2, code_version() + 1))
    scripts = [s.sql for s in seen if isinstance(s, Script)]
    assert "pg_advisory_xact_lock" in scripts[0] and "schema_version()" in scripts[-1]


def test_run_blocking_refuses_a_coroutine_that_suspends() -> None:
    async def suspends() -> None:
        await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="suspended"):
        run_blocking(suspends())
