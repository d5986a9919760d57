"""Callables for the observability tests: they log with a logger of their own and note the
span current inside the worker, so tests can check what the user's code sees."""

from __future__ import annotations

import logging
from typing import Any

import batchloop as bl

log = logging.getLogger("observe_jobs")
FAIL = {"times": 0}
WORKER_SPANS: list[Any] = []
"""The current OpenTelemetry span inside each worker call (what driver instrumentation nests
under)."""


@bl.work_query
async def take(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    rows = await conn.fetch("SELECT id FROM items WHERE name = $1 ORDER BY id LIMIT 10", name)
    log.info("work query found %d", len(rows))
    return bl.Work([r["id"] for r in rows]) if rows else bl.Idle(cooldown=0.0)


@bl.worker
async def put(conn: Any, batch: list[int]) -> None:
    try:
        from opentelemetry import trace

        WORKER_SPANS.append(trace.get_current_span())
    except ImportError:  # pragma: no cover
        pass
    log.info("deleting %d items", len(batch))
    await conn.execute("DELETE FROM items WHERE id = ANY($1)", batch)
    if FAIL["times"] > 0:
        FAIL["times"] -= 1
        raise RuntimeError("injected failure")
