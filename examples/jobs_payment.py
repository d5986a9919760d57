"""An idempotent payment-style job: retries (and a host dying mid-charge) never charge twice.

    pip install 'batchloop[fastapi]'
    BATCHLOOP_DSN=postgresql://user@localhost/mydb uvicorn --app-dir examples jobs_payment:app

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"amount_cents": 1250}'
    curl -X POST localhost:8000/orders/1/pay          # twice if you like: one job, one charge
    curl localhost:8000/orders/1                      # {"status": "paid", "charge_id": ...}

Delivery is at-least-once: a handler can run again after it did its external effect (the host
died before recording the result, or the provider's answer was lost and the handler raised).
Two keys make that harmless:

1. ``dispatch(..., key=f"charge:{order_id}")``: paying an order twice (a double click, a
   client retry) finds the first job and creates nothing.
2. The handler passes an idempotency key derived from the job (here the same
   ``charge:{order_id}``) to the payment provider, which returns the charge it already made
   for that key instead of making another (Stripe's ``Idempotency-Key``, Adyen's, and most
   providers' work this way). Never derive it from the attempt: every attempt must send the same.

The order is marked paid by ``on_complete``, in the same transaction that records the job as
completed, so the order and the job never disagree. A declined card raises
``jobs.NonRetryable``: no retries; the order ends ``failed`` and the job's error says why.

The provider here is a table standing in for a remote service (written on its own connection,
outside any transaction of the job's); ``timeouts_after_charge`` makes it take the money and
then fail to answer, for that many calls: what a network timeout looks like to the caller.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pydantic
from fastapi import FastAPI, HTTPException

import batchloop as bl
import batchloop.fastapi as blf
import batchloop.jobs as jobs

DSN = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL")
CARD_LIMIT_CENTS = 100_000

TABLES = """
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY, amount_cents int NOT NULL CHECK (amount_cents > 0),
    status text NOT NULL DEFAULT 'new', charge_id text, job_id bigint
);
CREATE TABLE IF NOT EXISTS provider_charges (   -- the payment provider's side
    idempotency_key text PRIMARY KEY, charge_id text NOT NULL, amount_cents int NOT NULL,
    calls int NOT NULL DEFAULT 1, created_at timestamptz NOT NULL DEFAULT now()
);
"""


class ProviderTimeout(Exception):
    """The provider took the request but its answer never came back."""


async def provider_charge(
    conn: asyncpg.Connection, idempotency_key: str, amount_cents: int, timeouts: int
) -> str:
    """The provider's API: one charge per idempotency key, whatever the number of calls."""
    row = await conn.fetchrow(
        "INSERT INTO provider_charges (idempotency_key, charge_id, amount_cents)"
        " VALUES ($1, $2, $3) ON CONFLICT (idempotency_key)"
        " DO UPDATE SET calls = provider_charges.calls + 1 RETURNING charge_id, calls",
        idempotency_key,
        f"ch_{uuid.uuid4().hex[:16]}",
        amount_cents,
    )
    if row["calls"] <= timeouts:
        raise ProviderTimeout(f"no answer from the provider (call {row['calls']})")
    return str(row["charge_id"])


class Charge(pydantic.BaseModel):
    order_id: int
    amount_cents: int = pydantic.Field(gt=0)
    timeouts_after_charge: int = pydantic.Field(default=0, ge=0, le=5)


async def record_outcome(conn: Any, run: jobs.JobRun) -> None:
    """on_complete: in the transaction that records the job's final state, exactly once."""
    order_id = run.payload["order_id"]
    if run.status == "completed" and run.result is not None:
        await conn.execute(
            "UPDATE orders SET status = 'paid', charge_id = $2 WHERE id = $1",
            order_id,
            run.result["charge_id"],
        )
    else:  # failed (declined, or out of attempts) or canceled
        await conn.execute("UPDATE orders SET status = $2 WHERE id = $1", order_id, run.status)


@jobs.job(
    "payments.charge",
    queue="payments",
    max_attempts=5,
    concurrency=4,
    lease=30.0,
    on_complete=record_outcome,
)
async def charge(ctx: jobs.JobContext, payload: Charge) -> dict[str, str]:
    if payload.amount_cents > CARD_LIMIT_CENTS:
        raise jobs.NonRetryable(f"card declined: {payload.amount_cents} cents is over the limit")
    async with pool().acquire() as conn:
        # The same key on every attempt: the job's own key, never anything per attempt.
        charge_id = await provider_charge(
            conn, f"charge:{payload.order_id}", payload.amount_cents, payload.timeouts_after_charge
        )
    return {"charge_id": charge_id}


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


class NewOrder(pydantic.BaseModel):
    amount_cents: int = pydantic.Field(gt=0)


class Pay(pydantic.BaseModel):
    timeouts_after_charge: int = 0


@app.post("/orders", status_code=201)
async def new_order(body: NewOrder) -> dict[str, Any]:
    order_id = await pool().fetchval(
        "INSERT INTO orders (amount_cents) VALUES ($1) RETURNING id", body.amount_cents
    )
    return {"id": order_id}


@app.post("/orders/{order_id}/pay", status_code=202)
async def pay(order_id: int, body: Pay | None = None) -> dict[str, Any]:
    body = body or Pay()
    async with pool().acquire() as conn, conn.transaction():
        amount = await conn.fetchval(
            "SELECT amount_cents FROM orders WHERE id = $1 FOR UPDATE", order_id
        )
        if amount is None:
            raise HTTPException(404, detail=f"no order {order_id}")
        payload = Charge(
            order_id=order_id,
            amount_cents=amount,
            timeouts_after_charge=body.timeouts_after_charge,
        )
        # A second pay of the same order returns the first job's id and creates nothing.
        job_id = await charge.dispatch(conn, payload, key=f"charge:{order_id}")
        await conn.execute(
            "UPDATE orders SET job_id = $2, status = CASE WHEN status = 'new'"
            " THEN 'paying' ELSE status END WHERE id = $1",
            order_id,
            job_id,
        )
    return {"order_id": order_id, "job_id": job_id}


@app.get("/orders/{order_id}")
async def order(order_id: int) -> dict[str, Any]:
    async with pool().acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
        if row is None:
            raise HTTPException(404, detail=f"no order {order_id}")
        run = await jobs.get(conn, row["job_id"]) if row["job_id"] is not None else None
        charges = await conn.fetchval(
            "SELECT count(*) FROM provider_charges WHERE idempotency_key = $1",
            f"charge:{order_id}",
        )
    return {
        **dict(row),
        "attempts": run.attempts if run is not None else 0,
        "job_status": run.status if run is not None else None,
        "error": run.error if run is not None else None,
        "provider_charges": charges,
    }
