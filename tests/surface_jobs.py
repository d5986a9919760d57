"""Job types for the jobs CLI and status-page tests (tests/test_jobs_cli.py, tests/test_web.py).

Module-level handlers, so a host given ``modules=["surface_jobs"]`` registers them; the tests
dispatch from their own process and the CLI (another process) never imports this module.
"""

from __future__ import annotations

import asyncio

import pydantic

import batchloop.jobs as jobs

QUEUE = "surf-main"
OTHER_QUEUE = "surf-other"
RELEASE: asyncio.Event | None = None
"""Set by a test to let ``surf.hold`` handlers finish; None: they finish at once."""


class Greeting(pydantic.BaseModel):
    name: str


class Number(pydantic.BaseModel):
    n: int


@jobs.job("surf.greet", queue=QUEUE, max_attempts=3)
async def greet(ctx: jobs.JobContext, payload: Greeting) -> dict[str, str]:
    return {"greeting": f"hello {payload.name}"}


@jobs.job("surf.boom", queue=QUEUE, max_attempts=3)
async def boom(ctx: jobs.JobContext, payload: Number) -> None:
    # With a terminal escape in it: the CLI must show it escaped, never send it.
    raise jobs.NonRetryable(f"boom {payload.n}: no such account \x1b[2J")


@jobs.job("surf.count", queue=OTHER_QUEUE, max_attempts=2)
async def count(ctx: jobs.JobContext, payload: Number) -> dict[str, int]:
    return {"n": payload.n}


@jobs.job("surf.hold", queue=OTHER_QUEUE, max_attempts=1)
async def hold(ctx: jobs.JobContext, payload: Number) -> dict[str, int]:
    """Runs until RELEASE is set or a cancel arrives (polled: what a long handler does)."""
    await ctx.progress(10)
    while RELEASE is not None and not RELEASE.is_set():
        if await ctx.cancelled():
            return {"stopped_at": 10}
        await asyncio.sleep(0.02)
    return {"n": payload.n}


COMPLETED: list[tuple[int, str]] = []
"""(job id, final status) as on_complete saw them, in this process."""


async def note_outcome(conn: object, run: jobs.JobRun) -> None:
    COMPLETED.append((run.id, run.status))


@jobs.job("surf.tracked", queue=QUEUE, on_complete=note_outcome)
async def tracked(ctx: jobs.JobContext, payload: Number) -> None:
    return None
