"""pgqueuer (https://github.com/janbjorge/pgqueuer) in the drain benchmark.

Tuned per its "Performance Tuning" guide and its own ``tools/benchmark.py`` drain strategy:
``batch_size`` = the benchmark's batch size (jobs per ``FOR UPDATE SKIP LOCKED`` dequeue), no
``max_concurrent_tasks`` cap (bench/jobs.py sets the entrypoint's ``concurrency_limit``: option
``pgq_concurrency_limit``), one dedicated asyncpg connection per ``QueueManager``
(``AsyncpgDriver``, as the guide recommends over a pool), ``pgq autovac`` settings applied,
durability left ``durable`` (logged tables, like the user table of raw and batchloop), and
``mode=drain`` so ``run()`` returns once the queue is empty and every job's status is flushed.
``workers`` QueueManagers run side by side (pgqueuer's own benchmark defaults to 5); the
event loop is whatever the harness runs (``--loop``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg

from .common import count, settle

ENQUEUE_CHUNK = 10_000


def settings(batch: int, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "batch_size": batch,
        "workers": int(options.get("pgq_workers", 1)),
        "driver": "AsyncpgDriver (one connection per QueueManager)",
        "max_concurrent_tasks": None,
        "concurrency_limit": int(options.get("pgq_concurrency_limit", 0)),  # 0: none
        "durability": "durable",
        "autovac": True,
        "mode": "drain",
    }


async def trial(dsn: str, rows: int, batch: int, options: dict[str, Any]) -> dict[str, Any]:
    from pgqueuer import AsyncpgDriver, Job, Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    used = settings(batch, options)
    admin = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(admin))
        await queries.install()
        await queries.optimize_autovacuum()  # what `pgq autovac` runs
        started = time.perf_counter()
        for offset in range(0, rows, ENQUEUE_CHUNK):
            k = min(ENQUEUE_CHUNK, rows - offset)
            await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
        enqueue_s = time.perf_counter() - started
    finally:
        await admin.close()
    await settle(dsn, "pgqueuer")

    conns = [await asyncpg.connect(dsn) for _ in range(used["workers"])]
    managers = []
    for conn in conns:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop", concurrency_limit=used["concurrency_limit"])
        async def noop(job: Job) -> None:
            return None

        managers.append(qm)
    try:
        started = time.perf_counter()
        await asyncio.gather(
            *(qm.run(batch_size=batch, mode=QueueExecutionMode.drain) for qm in managers)
        )
        drain_s = time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()
    return {
        "enqueue_s": enqueue_s,
        "drain_s": drain_s,
        "remaining": await count(dsn, "pgqueuer"),
        "settings": used,
    }
