"""Typed jobs dispatched from a FastAPI endpoint, inside the request's own transaction.

    pip install 'batchloop[fastapi]'
    BATCHLOOP_DSN=postgresql://user@localhost/mydb uvicorn --app-dir examples jobs_typed:app

    curl -X POST localhost:8000/signup -H 'content-type: application/json' \\
         -d '{"email": "ann@example.com", "name": "Ann"}'
    curl localhost:8000/jobs/1

One module defines several jobs, each typed by its handler's payload annotation (a pydantic
model, or any type pydantic validates: ``list[int]`` here). ``POST /signup`` inserts the user
and dispatches a welcome email and a stats refresh in the same transaction: if the insert
fails (the email is taken), no job exists; if the request's transaction commits, both do.
``dispatch`` validates the payload before any SQL, so a bad payload is a 422 and creates
nothing. The app runs a ``Host`` for its lifetime, so the same process runs the handlers (run
``batchloop run jobs_typed`` elsewhere to run them in other processes instead, or too).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pydantic
from fastapi import FastAPI, HTTPException

import batchloop as bl
import batchloop.fastapi as blf
import batchloop.jobs as jobs

DSN = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL")

TABLES = """
CREATE TABLE IF NOT EXISTS users (
    id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, name text NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    id bigserial PRIMARY KEY, kind text NOT NULL, body jsonb NOT NULL,
    sent_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS user_stats (id int PRIMARY KEY, users bigint NOT NULL);
"""


# ------------------------------------------------------------------------------ the jobs


class WelcomeEmail(pydantic.BaseModel):
    to: str = pydantic.Field(pattern=r"^[^@\s]+@[^@\s]+$")
    name: str = pydantic.Field(min_length=1)


class Thumbnail(pydantic.BaseModel):
    user_id: int
    size: int = pydantic.Field(default=128, ge=16, le=1024)


@jobs.job("signup.welcome_email", queue="emails", max_attempts=5, concurrency=5)
async def send_welcome_email(ctx: jobs.JobContext, payload: WelcomeEmail) -> dict[str, Any]:
    # A real handler calls an email service here: outside any transaction, so a slow provider
    # holds no database lock. The outbox row stands in for that call.
    async with pool().acquire() as conn:
        sent = await conn.fetchval(
            "INSERT INTO outbox (kind, body) VALUES ('welcome', $1::jsonb) RETURNING id",
            payload.model_dump_json(),
        )
    return {"outbox_id": sent}


@jobs.job("signup.refresh_stats", queue="maintenance", max_attempts=3, concurrency=1)
async def refresh_stats(ctx: jobs.JobContext, payload: list[int]) -> dict[str, int]:
    """The payload is the new users' ids: any type pydantic validates is a job's contract."""
    async with pool().acquire() as conn:
        users = await conn.fetchval(
            "INSERT INTO user_stats (id, users) SELECT 1, count(*) FROM users"
            " ON CONFLICT (id) DO UPDATE SET users = excluded.users RETURNING users"
        )
    return {"users": users, "new": len(payload)}


@jobs.job("signup.thumbnail", queue="media", max_attempts=3, concurrency=2)
async def make_thumbnail(ctx: jobs.JobContext, payload: Thumbnail) -> dict[str, int]:
    await ctx.progress(50)
    return {"user_id": payload.user_id, "size": payload.size}


# ------------------------------------------------------------------------------ the app


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Migrate and create the tables (an example's convenience: deploys run ``batchloop
    migrate`` once), then run a Host for the app's lifetime (``app.state.batchloop``)."""
    await bl.migrate(DSN)
    conn = await asyncpg.connect(DSN)
    try:
        await conn.execute(TABLES)
    finally:
        await conn.close()
    async with blf.lifespan(DSN, modules=[__name__])(app):
        yield


def pool() -> Any:
    """The host's pool: the handlers' connections too (they run in this process)."""
    return app.state.batchloop.pool


app = FastAPI(lifespan=lifespan)


# ``conn: blf.Transaction``: a connection of the host's pool in a transaction that commits
# after the endpoint returns and before the response is sent (rolled back when it raises), so a
# 201 means the user and its jobs exist.
Tx = blf.Transaction


class Signup(pydantic.BaseModel):
    email: str
    name: str
    thumbnail_size: int | None = None


@app.post("/signup", status_code=201)
async def signup(body: Signup, conn: Tx) -> dict[str, Any]:
    try:
        # Validated first, so a bad email is a 422 before the user row is even written.
        email = WelcomeEmail(to=body.email, name=body.name)
    except pydantic.ValidationError as exc:
        raise HTTPException(422, detail=exc.errors(include_url=False)) from None
    user_id = await conn.fetchval(
        "INSERT INTO users (email, name) VALUES ($1, $2) ON CONFLICT (email) DO NOTHING"
        " RETURNING id",
        body.email,
        body.name,
    )
    if user_id is None:
        raise HTTPException(409, detail=f"{body.email} is already signed up")
    ids = {
        "welcome_email": await send_welcome_email.dispatch(conn, email, key=f"welcome:{user_id}"),
        "refresh_stats": await refresh_stats.dispatch(conn, [user_id]),
    }
    if body.thumbnail_size is not None:
        try:
            ids["thumbnail"] = await make_thumbnail.dispatch(
                conn, Thumbnail(user_id=user_id, size=body.thumbnail_size)
            )
        except pydantic.ValidationError as exc:
            # Raising rolls the whole request back: no user, and neither job above.
            raise HTTPException(422, detail=exc.errors(include_url=False)) from None
    return {"user_id": user_id, "jobs": ids}


@app.get("/jobs/{job_id}")
async def job(job_id: int) -> dict[str, Any]:
    async with pool().acquire() as conn:
        run = await jobs.get(conn, job_id)
    if run is None:
        raise HTTPException(404, detail=f"no job {job_id}")
    return run.model_dump(mode="json")
