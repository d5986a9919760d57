"""Job types for tests/test_jobs*.py (module-level, so every host registers the same ones)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pydantic

import batchloop.jobs as jobs
from batchloop.runtime.host import current_host


class Item(pydantic.BaseModel):
    n: int
    fail_times: int = 0
    """Raise on the first this many attempts."""
    sleep: float = 0.0
    note: str = ""


GATES: dict[int, asyncio.Event] = {}
"""Handlers of `gated` wait for GATES[n] to be set (created on demand)."""
STARTED: list[tuple[int, int]] = []
"""(n, attempt) of every handler start in this process."""
COMPLETED: list[tuple[int, str]] = []
"""(job id, status) of every on_complete call in this process."""


def gate(n: int) -> asyncio.Event:
    return GATES.setdefault(n, asyncio.Event())


async def record(conn: Any, run: jobs.JobRun) -> None:
    COMPLETED.append((run.id, run.status))
    if type(conn).__module__.startswith("psycopg"):
        sql = "INSERT INTO completions (job_id, status) VALUES (%s, %s)"
        await conn.execute(sql, (run.id, run.status))
    else:
        await conn.execute(
            "INSERT INTO completions (job_id, status) VALUES ($1, $2)", run.id, run.status
        )


@jobs.job("t.echo", queue="core", max_attempts=3, on_complete=record)
async def echo(ctx: jobs.JobContext, payload: Item) -> dict[str, Any]:
    STARTED.append((payload.n, ctx.attempt))
    if ctx.attempt <= payload.fail_times:
        raise RuntimeError(f"failing attempt {ctx.attempt}")
    if payload.sleep:
        await asyncio.sleep(payload.sleep)
    return {"n": payload.n, "attempt": ctx.attempt}


@jobs.job("t.gated", queue="core", max_attempts=3, on_complete=record)
async def gated(ctx: jobs.JobContext, payload: Item) -> dict[str, Any] | None:
    STARTED.append((payload.n, ctx.attempt))
    await ctx.progress(40)
    await gate(payload.n).wait()
    if await ctx.cancelled():
        return {"stopped": True}
    return {"n": payload.n}


@jobs.job("t.fatal", queue="core", on_complete=record)
async def fatal(ctx: jobs.JobContext, payload: Item) -> None:
    raise jobs.NonRetryable(f"no way: {payload.n}")


FLAKY = {"fail": True}


@jobs.job("t.flaky", queue="core", max_attempts=1, on_complete=record)
async def flaky(ctx: jobs.JobContext, payload: Item) -> dict[str, Any]:
    if FLAKY["fail"]:
        raise RuntimeError("flaky for now")
    return {"n": payload.n}


BLOCK = os.environ.get("JOBS_BLOCK") == "1"
"""Set in a host subprocess that is to be killed mid-job."""


@jobs.job("t.sticky", queue="sticky", lease=1.0, max_attempts=3, on_complete=record)
async def sticky(ctx: jobs.JobContext, payload: Item) -> dict[str, Any]:
    await ctx.progress(10)
    if BLOCK:
        await asyncio.Event().wait()
    return {"n": payload.n, "pid": os.getpid()}


RUNNING = {"now": 0, "max": 0}
HOSTS: list[str] = []
"""host_id of the Host that ran each `limited` handler."""


@jobs.job("t.limited", queue="limited", concurrency=3, on_complete=record)
async def limited(ctx: jobs.JobContext, payload: Item) -> None:
    host = current_host()
    HOSTS.append(host.host_id if host is not None else "?")
    RUNNING["now"] += 1
    RUNNING["max"] = max(RUNNING["max"], RUNNING["now"])
    try:
        await asyncio.sleep(payload.sleep)
    finally:
        RUNNING["now"] -= 1


@jobs.job("t.swept", queue="swept", retention=0.5)
async def swept(ctx: jobs.JobContext, payload: int) -> None:
    return None


async def explode(conn: Any, run: jobs.JobRun) -> None:
    await record(conn, run)
    raise RuntimeError("on_complete exploded")


@jobs.job("t.loud", queue="core", on_complete=explode)
async def loud(ctx: jobs.JobContext, payload: Item) -> Any:
    if payload.n < 0:
        return [payload.n]  # not a dict: the attempt fails
    return {"n": payload.n}


@jobs.job("t.later", queue="core")
async def later(ctx: jobs.JobContext, payload: Later) -> None:
    return None


class Later(pydantic.BaseModel):
    """Defined after its handler: the annotation resolves on first use."""

    x: int


@jobs.job("t.odd", queue="core", max_attempts=1, on_complete=record)
async def odd(ctx: jobs.JobContext, payload: Item) -> dict[str, Any]:
    if payload.n == 1:
        return {"x": float("inf")}  # not JSON
    if payload.n == 2:
        return {"x": 10**200000}  # JSON, but beyond PostgreSQL's numeric
    return {"n": payload.n}


@jobs.job("t.long", queue="long", lease=0.6, on_complete=record)
async def long(ctx: jobs.JobContext, payload: Item) -> dict[str, Any]:
    STARTED.append((payload.n, ctx.attempt))
    await asyncio.sleep(payload.sleep)  # the work: several leases long
    return {"attempt": ctx.attempt}


async def connect_fresh(dsn: str) -> Any:
    """An asyncpg connection to a test database with the ``completions`` table that
    ``on_complete`` writes, and this module's records of a previous test cleared."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute(
        "CREATE TABLE completions (job_id bigint NOT NULL, status text NOT NULL,"
        " at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    STARTED.clear()
    COMPLETED.clear()
    GATES.clear()
    RUNNING.update(now=0, max=0)
    HOSTS.clear()
    return conn


async def status(conn: Any, job_id: int) -> str | None:
    """The job's status, None once it is gone."""
    run = await jobs.get(conn, job_id)
    return None if run is None else run.status
