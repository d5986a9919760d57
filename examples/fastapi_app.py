"""A FastAPI app whose requests insert orders and ping the loop that processes them.

Each process that serves the app runs a batchloop Host (``batchloop.fastapi.lifespan``): run two
and the loop ``orders`` runs in one of them; stop that one and the other takes over. Run it::

    pip install 'batchloop[fastapi]'
    export BATCHLOOP_DSN=postgresql://user@127.0.0.1:5432/mydb
    batchloop migrate
    python examples/fastapi_app.py                # serves on $PORT (default 8000)
    curl -X POST 'localhost:8000/orders?item=book'
    curl localhost:8000/orders/1                  # processed_at and processed_by once done

Environment: ``BATCHLOOP_DSN`` (else ``DATABASE_URL``, else the ``PG*`` variables);
``BATCHLOOP_CONTROL_DSN`` when ``BATCHLOOP_DSN`` goes through PgBouncer in transaction mode (see
docker-compose.yml); ``PORT``; ``ORDER_WORK_SECONDS``, a pretend cost of each batch.

On SIGTERM uvicorn stops accepting requests and finishes those in flight, then the host lets
its batch finish, hands the name to another host and the process exits 0.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request

import batchloop as bl
import batchloop.fastapi as blf

DSN = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL") or None
CONTROL_DSN = os.environ.get("BATCHLOOP_CONTROL_DSN") or None
WORK_SECONDS = float(os.environ.get("ORDER_WORK_SECONDS", "0"))
PROCESS = f"{socket.gethostname()}:{os.getpid()}"  # in a container, the hostname tells which

TABLE = """
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    item text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    processed_by text  -- hostname:pid of the process whose host ran the batch
);
CREATE INDEX IF NOT EXISTS orders_unprocessed ON orders (id) WHERE processed_at IS NULL;
"""


@bl.work_query
async def unprocessed_orders(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    rows = await conn.fetch("SELECT id FROM orders WHERE processed_at IS NULL ORDER BY id LIMIT 50")
    return bl.Work([r["id"] for r in rows]) if rows else bl.Idle()


@bl.worker
async def process_orders(conn: Any, batch: list[int]) -> None:
    if WORK_SECONDS:  # stands in for real work on the batch (seen in pg_stat_activity)
        await conn.execute("SELECT pg_sleep($1)", WORK_SECONDS)
    await conn.execute(
        "UPDATE orders SET processed_at = now(), processed_by = $2 WHERE id = ANY($1)",
        batch,
        PROCESS,
    )


@contextlib.asynccontextmanager
async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's own start-up, entered once the host runs (so its pool is there)."""
    async with app.state.batchloop.pool.acquire() as conn, conn.transaction():
        # Replicas start together: concurrent CREATE TABLE IF NOT EXISTS can still collide.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext('examples.fastapi_app'))")
        await conn.execute(TABLE)
    yield


app = FastAPI(
    lifespan=blf.lifespan(DSN, modules=[__name__], inner=app_lifespan, control_dsn=CONTROL_DSN)
)


@app.post("/orders")
async def create_order(conn: blf.Transaction, item: str, fail: bool = False) -> dict[str, Any]:
    """Insert an order and ping ``orders`` in the request's transaction: the order is processed
    if and only if the transaction commits. ``fail=true`` raises after both, so nothing stays."""
    order_id = await conn.fetchval("INSERT INTO orders (item) VALUES ($1) RETURNING id", item)
    await bl.ping(conn, "orders", unprocessed_orders, process_orders)
    if fail:
        raise HTTPException(status_code=500, detail="failed after the insert: rolled back")
    return {"id": order_id}


@app.get("/orders/{order_id}")
async def get_order(conn: blf.Transaction, order_id: int) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT * FROM orders WHERE id = $1", order_id)
    if row is None:
        raise HTTPException(status_code=404, detail="no such order")
    return dict(row)


@app.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    """200 while this process's host is healthy (a readiness probe), else 503."""
    health = blf.host(request).health()
    if not health.ok:
        raise HTTPException(status_code=503, detail=health.problems)
    return health.model_dump()


def serve() -> int:
    import uvicorn

    # uvicorn re-raises the SIGTERM it handled once it has shut down, and Python's default
    # action would then end the process with 143 after a clean drain; exit 0 instead (also
    # for a SIGTERM that arrives before uvicorn has installed its own handler).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        "fastapi_app:app",  # imported by name, so its callables' names match a `uvicorn` run
        app_dir=str(Path(__file__).parent),
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        log_level=os.environ.get("LOG_LEVEL", "info"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(serve())
