"""Recipe: an LLM batch poller (the cron-poller pattern), on a host or behind an HTTP cron.

    DATABASE_URL=postgresql://user@localhost/mydb python -m examples.recipes.llm_poller

Batch APIs (OpenAI's, Anthropic's, ...) take a file of requests and finish minutes or hours
later; the client has to poll. Here the batches in flight are rows of ``llm_batches``, each
with its ``next_poll_at``. One batchloop name, ``llm-batches``, runs the poller:

* the work query returns the batches due for a poll, or, when none is due,
  ``Idle(timeout=seconds until the next one is due)``: batchloop is the scheduler, and an idle
  poller costs nothing between polls;
* the worker polls each batch (here a simulated provider, ``SimulatedProvider``, whose state is
  a table so that every process sees the same); a batch still running is due again after its
  ``poll_every``; on a terminal state it delivers the results **once**: they are upserted on
  ``(provider, batch_id, custom_id)`` in the batch's transaction, so a poll that runs twice
  (the transaction rolled back after the provider answered) delivers nothing twice;
* every pass records a report ``{checked, delivered, failed}`` (``llm_poll_passes``, written
  in the same transaction, and logged).

Submitting a batch inserts its row and pings ``llm-batches`` in one transaction.

Platforms whose only scheduler is an HTTP cron (Vercel, Netlify, Cloud Scheduler, ...) run the
same callables with :func:`batchloop.tick` behind a route that checks a shared secret,
``Authorization: Bearer $CRON_SECRET`` (401 otherwise). ``create_app`` is that Starlette app
(``pip install starlette uvicorn``)::

    CRON_SECRET=... DATABASE_URL=... uvicorn --factory examples.recipes.llm_poller:create_app
    curl -H "Authorization: Bearer $CRON_SECRET" -X POST localhost:8000/cron/llm-batches

It answers with the passes run meanwhile, summed, and the tick's report (500 if a pass
failed, so the cron platform alerts). The tables and the batchloop schema must exist
(``create_tables``, ``batchloop migrate``) before the first call.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

import batchloop as bl

from ._common import dsn_from_env

log = logging.getLogger(__name__)

NAME = "llm-batches"
BATCH = 20
"""Batches polled per pass (each pass is one transaction)."""

SCHEMA = """
CREATE TABLE IF NOT EXISTS llm_batches (
    provider text NOT NULL,
    batch_id text NOT NULL,
    status text NOT NULL DEFAULT 'in_progress'
        CHECK (status IN ('in_progress', 'delivered', 'failed')),
    poll_every interval NOT NULL DEFAULT '30 seconds',
    next_poll_at timestamptz NOT NULL DEFAULT now(),
    polls int NOT NULL DEFAULT 0,
    error text,
    finished_at timestamptz,
    PRIMARY KEY (provider, batch_id)
);
CREATE INDEX IF NOT EXISTS llm_batches_due ON llm_batches (next_poll_at)
    WHERE status = 'in_progress';
CREATE TABLE IF NOT EXISTS llm_results (
    provider text NOT NULL,
    batch_id text NOT NULL,
    custom_id text NOT NULL,
    output jsonb NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, batch_id, custom_id)
);
CREATE TABLE IF NOT EXISTS llm_poll_passes (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    checked int NOT NULL,
    delivered int NOT NULL,
    failed int NOT NULL
);
-- The simulated provider's side: what its API would answer.
CREATE TABLE IF NOT EXISTS sim_llm_provider (
    provider text NOT NULL,
    batch_id text NOT NULL,
    polls int NOT NULL DEFAULT 0,
    done_after int NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('completed', 'failed', 'expired')),
    results jsonb NOT NULL DEFAULT '[]',
    PRIMARY KEY (provider, batch_id)
);
"""

DUE = """
SELECT provider, batch_id FROM llm_batches
WHERE status = 'in_progress' AND next_poll_at <= now()
ORDER BY next_poll_at LIMIT $1
"""
NEXT_DUE_IN = """
SELECT extract(epoch FROM min(next_poll_at) - now())::float8 FROM llm_batches
WHERE status = 'in_progress'
"""


@dataclass
class PassReport:
    """What one pass did: batches polled, batches whose results were delivered, failed ones."""

    checked: int = 0
    delivered: int = 0
    failed: int = 0

    def add(self, other: PassReport) -> None:
        self.checked += other.checked
        self.delivered += other.delivered
        self.failed += other.failed


@dataclass(frozen=True)
class Poll:
    """A provider's answer about one batch."""

    status: str
    """``in_progress``, or terminal: ``completed``, ``failed``, ``expired``."""
    results: list[dict[str, Any]]
    """For ``completed``: ``{"custom_id": ..., "output": ...}`` per request."""


class SimulatedProvider:
    """Stands in for a provider's batch API. A real one is an HTTP call: keep it outside any
    lock you can, and remember it may run twice for one batch (the delivery is idempotent)."""

    async def retrieve(self, conn: Any, provider: str, batch_id: str) -> Poll:
        row = await conn.fetchrow(
            "UPDATE sim_llm_provider SET polls = polls + 1 "
            "WHERE provider = $1 AND batch_id = $2 RETURNING polls, done_after, outcome, results",
            provider,
            batch_id,
        )
        if row is None:
            return Poll("expired", [])  # the provider does not know it
        if row["polls"] < row["done_after"]:
            return Poll("in_progress", [])
        results = json.loads(row["results"]) if row["outcome"] == "completed" else []
        return Poll(row["outcome"], results)


provider_api = SimulatedProvider()


async def create_tables(conn: Any) -> None:
    await conn.execute(SCHEMA)


async def submit(conn: Any, provider: str, batch_id: str, *, poll_every: float = 30.0) -> None:
    """Track a batch just created at the provider: in the caller's transaction, with the ping."""
    await conn.execute(
        "INSERT INTO llm_batches (provider, batch_id, poll_every) "
        "VALUES ($1, $2, make_interval(secs => $3)) ON CONFLICT DO NOTHING",
        provider,
        batch_id,
        poll_every,
    )
    await bl.ping(conn, NAME, due_batches, poll_batches)


@bl.work_query
async def due_batches(conn: Any, name: str) -> bl.Work[list[list[str]]] | bl.Idle:
    rows = await conn.fetch(DUE, BATCH)
    if rows:
        return bl.Work([[r["provider"], r["batch_id"]] for r in rows])
    next_in = await conn.fetchval(NEXT_DUE_IN)
    if next_in is None:
        return bl.Idle()  # nothing in flight: idle until a submit pings
    return bl.Idle(timeout=max(0.0, next_in))


@bl.worker
async def poll_batches(conn: Any, batch: list[list[str]]) -> None:
    report = PassReport()
    for provider, batch_id in batch:
        report.checked += 1
        answer = await provider_api.retrieve(conn, provider, batch_id)
        if answer.status == "in_progress":
            await conn.execute(
                "UPDATE llm_batches SET polls = polls + 1, next_poll_at = now() + poll_every "
                "WHERE provider = $1 AND batch_id = $2",
                provider,
                batch_id,
            )
        elif answer.status == "completed":
            await deliver(conn, provider, batch_id, answer.results)
            report.delivered += 1
        else:
            await conn.execute(
                "UPDATE llm_batches SET polls = polls + 1, status = 'failed', error = $3, "
                "finished_at = now() WHERE provider = $1 AND batch_id = $2",
                provider,
                batch_id,
                f"provider says {answer.status}",
            )
            report.failed += 1
    await conn.execute(
        "INSERT INTO llm_poll_passes (checked, delivered, failed) VALUES ($1, $2, $3)",
        report.checked,
        report.delivered,
        report.failed,
    )
    log.info("llm poll pass: %s", asdict(report))


async def deliver(conn: Any, provider: str, batch_id: str, results: list[dict[str, Any]]) -> int:
    """Store a finished batch's results, once: returns how many were new (0 on a replay)."""
    inserted = await conn.fetchval(
        """
        WITH new AS (
            INSERT INTO llm_results (provider, batch_id, custom_id, output)
            SELECT $1, $2, r->>'custom_id', r->'output' FROM jsonb_array_elements($3::jsonb) r
            ON CONFLICT (provider, batch_id, custom_id) DO NOTHING
            RETURNING 1
        )
        SELECT count(*) FROM new
        """,
        provider,
        batch_id,
        json.dumps(results),
    )
    await conn.execute(
        "UPDATE llm_batches SET polls = polls + 1, status = 'delivered', finished_at = now() "
        "WHERE provider = $1 AND batch_id = $2",
        provider,
        batch_id,
    )
    return int(inserted)


async def passes_since(conn: Any, after_id: int) -> tuple[int, PassReport]:
    """The passes recorded after pass ``after_id``, summed; and the last pass id."""
    row = await conn.fetchrow(
        "SELECT coalesce(max(id), $1) AS last, coalesce(sum(checked), 0) AS checked, "
        "coalesce(sum(delivered), 0) AS delivered, coalesce(sum(failed), 0) AS failed "
        "FROM llm_poll_passes WHERE id > $1",
        after_id,
    )
    return int(row["last"]), PassReport(
        int(row["checked"]), int(row["delivered"]), int(row["failed"])
    )


def create_app(dsn: str | None = None, secret: str | None = None, budget: float = 20.0) -> Any:
    """The HTTP cron route: ``GET`` or ``POST /cron/llm-batches`` with ``Authorization: Bearer
    <secret>`` runs one :func:`batchloop.tick` of ``llm-batches`` and answers its report.

    ``dsn`` defaults to ``DATABASE_URL`` (or ``BATCHLOOP_DSN``), ``secret`` to ``CRON_SECRET``;
    without a secret the app refuses to start rather than serve the route to anyone.
    """
    import asyncpg
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    dsn = dsn or os.environ.get("DATABASE_URL") or os.environ.get("BATCHLOOP_DSN")
    secret = secret if secret is not None else os.environ.get("CRON_SECRET", "")
    if not dsn:
        raise SystemExit("llm_poller: set DATABASE_URL (or BATCHLOOP_DSN)")
    if not secret:
        raise SystemExit("llm_poller: set CRON_SECRET: the cron route needs a shared secret")
    expected = f"Bearer {secret}".encode()

    async def cron(request: Request) -> JSONResponse:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse({"error": "unauthorized"}, status_code=401)
        conn = await asyncpg.connect(dsn)
        try:
            before, _ = await passes_since(conn, 0)
            report = await bl.tick(conn, [NAME], budget=budget)
            _, passes = await passes_since(conn, before)
        finally:
            await conn.close()
        return JSONResponse(
            {
                **asdict(passes),
                "batches": report.batches,
                "drained": report.drained,
                "busy": report.busy,
                "errors": [f.error for f in report.failed],
            },
            status_code=500 if report.failed else 200,
        )

    return Starlette(routes=[Route("/cron/llm-batches", cron, methods=["GET", "POST"])])


async def simulate(
    conn: Any,
    provider: str,
    batch_id: str,
    *,
    done_after: int,
    outcome: str,
    results: list[dict[str, Any]] | None = None,
) -> None:
    """Create a batch at the simulated provider: terminal after ``done_after`` polls."""
    await conn.execute(
        "INSERT INTO sim_llm_provider (provider, batch_id, done_after, outcome, results) "
        "VALUES ($1, $2, $3, $4, $5::jsonb)",
        provider,
        batch_id,
        done_after,
        outcome,
        json.dumps(results or []),
    )


async def main(dsn: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    await bl.migrate(dsn)
    async with bl.Host(dsn) as host, host.pool.acquire() as conn:
        await create_tables(conn)
        outputs = [{"custom_id": f"req-{i}", "output": {"text": f"answer {i}"}} for i in (1, 2)]
        await simulate(conn, "demo", "b-ok", done_after=3, outcome="completed", results=outputs)
        await simulate(conn, "demo", "b-bad", done_after=2, outcome="expired")
        async with conn.transaction():
            for batch_id in ("b-ok", "b-bad"):
                await submit(conn, "demo", batch_id, poll_every=0.5)
        for _ in range(200):
            left = await conn.fetchval(
                "SELECT count(*) FROM llm_batches WHERE status = 'in_progress'"
            )
            if left == 0:
                break
            await asyncio.sleep(0.05)
        rows = await conn.fetch("SELECT batch_id, status, polls FROM llm_batches ORDER BY 1")
        results = await conn.fetchval("SELECT count(*) FROM llm_results")
    for r in rows:
        print(f"{r['batch_id']}: {r['status']} after {r['polls']} polls")
    print(f"{results} results delivered")


if __name__ == "__main__":
    asyncio.run(main(dsn_from_env("llm_poller")))
