"""The jobs that ``bench/jobs.py`` measures, in a module of their own so that the trial and host
processes register them under one importable name (never ``__main__``)."""

from __future__ import annotations

import os
import time

import pydantic

import batchloop.jobs as jobs

QUEUE = "bench"
CONCURRENCY = int(os.environ.get("BENCH_JOBS_CONCURRENCY", "10"))
"""Set by the orchestrator for its trial processes (``--concurrency``)."""


class Noop(pydantic.BaseModel):
    n: int = 0


@jobs.job("bench.noop", queue=QUEUE, concurrency=CONCURRENCY, max_attempts=3)
async def noop(ctx: jobs.JobContext, payload: Noop) -> None:
    return None


@jobs.job("bench.stamp", queue=QUEUE, concurrency=CONCURRENCY, max_attempts=3)
async def stamp(ctx: jobs.JobContext, payload: Noop) -> dict[str, float]:
    """Returns the clock as its first act: the latency scenario's end point."""
    return {"started": time.monotonic()}
