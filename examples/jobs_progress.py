"""A report job that reports its progress, a client polling it, and cancel from another request.

    pip install 'batchloop[fastapi]'
    BATCHLOOP_DSN=postgresql://user@localhost/mydb uvicorn --app-dir examples jobs_progress:app

    curl -X POST localhost:8000/reports -H 'content-type: application/json' -d '{"rows": 50}'
    curl localhost:8000/reports/1            # {"status": "running", "progress": 40, ...}
    curl -X POST localhost:8000/reports/1/cancel

The handler runs outside any transaction, chunk by chunk; after each chunk it stores its
progress (``ctx.progress``, visible to ``jobs.get`` at once) and asks whether the job was
canceled (``ctx.cancelled``). A cancel from another request turns that True; the job then ends
``canceled`` whatever the handler returns, so returning early is only about stopping the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from fastapi import FastAPI, HTTPException

import batchloop as bl
import batchloop.fastapi as blf
import batchloop.jobs as jobs

DSN = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL")


class ReportRequest(pydantic.BaseModel):
    rows: int = pydantic.Field(ge=1, le=100_000)
    seconds_per_row: float = pydantic.Field(default=0.05, ge=0.0, le=10.0)
    """How long each row takes: a stand-in for real work (queries, an API, rendering)."""


@jobs.job("reports.build", queue="reports", max_attempts=3, concurrency=2, lease=30.0)
async def build_report(ctx: jobs.JobContext, payload: ReportRequest) -> dict[str, Any] | None:
    total = 0
    for row in range(payload.rows):
        await asyncio.sleep(payload.seconds_per_row)  # the work itself
        total += row
        done = (row + 1) * 100 // payload.rows
        await ctx.progress(done)
        if await ctx.cancelled():
            return None  # stop working; the job is recorded canceled either way
    return {"rows": payload.rows, "sum": total}


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Migrate and create the tables (an example's convenience: deploys run ``batchloop
    migrate`` once), then run a Host for the app's lifetime (``app.state.batchloop``)."""
    await bl.migrate(DSN)
    async with blf.lifespan(DSN, modules=[__name__])(app):
        yield


def pool() -> Any:
    """The host's pool: the handlers' connections too (they run in this process)."""
    return app.state.batchloop.pool


app = FastAPI(lifespan=lifespan)


def _view(run: jobs.JobRun) -> dict[str, Any]:
    """What a client needs to draw a progress bar, and the result once there is one."""
    return {
        "id": run.id,
        "status": run.status,
        "progress": run.progress,
        "attempts": run.attempts,
        "result": run.result,
        "error": run.error,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "completed_at": run.completed_at.isoformat() if run.completed_at else None,
    }


@app.post("/reports", status_code=202)
async def start_report(body: ReportRequest, conn: blf.Transaction) -> dict[str, Any]:
    job_id = await build_report.dispatch(conn, body)  # exists once the request commits
    return {"id": job_id, "poll": f"/reports/{job_id}"}


@app.get("/reports/{job_id}")
async def report(job_id: int) -> dict[str, Any]:
    async with pool().acquire() as conn:
        run = await jobs.get(conn, job_id)
    if run is None or run.type != "reports.build":
        raise HTTPException(404, detail=f"no report {job_id}")
    return _view(run)


@app.post("/reports/{job_id}/cancel")
async def cancel_report(job_id: int) -> dict[str, Any]:
    async with pool().acquire() as conn:
        run = await jobs.get(conn, job_id)
        if run is None or run.type != "reports.build":
            raise HTTPException(404, detail=f"no report {job_id}")
        canceled = await jobs.cancel(conn, job_id)
        run = await jobs.get(conn, job_id)
        if not canceled:
            status = run.status if run is not None else "gone"
            raise HTTPException(409, detail=f"report {job_id} is already {status}")
    assert run is not None
    return _view(run)
