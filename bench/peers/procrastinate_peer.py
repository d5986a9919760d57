"""procrastinate (https://github.com/procrastinate-org/procrastinate) in the drain benchmark.

procrastinate fetches one job per ``procrastinate_fetch_job`` call and has no batch-size
setting; its documented throughput knob is ``concurrency`` (asynchronous sub-workers in one
worker, "Execute multiple jobs at the same time"). So the benchmark's batch size maps to
``concurrency = min(batch, max_concurrency)``, with a psycopg pool one connection larger
(the LISTEN connection). ``delete_jobs="always"`` (its "Delete finished jobs" guide; it also
leaves the job table empty, like the other systems), ``wait=False`` (the worker returns once it
has caught up with the queue), ``listen_notify`` and polling intervals at their defaults.
"""

from __future__ import annotations

import time
from typing import Any

from .common import count, settle

ENQUEUE_CHUNK = 5_000


def settings(batch: int, options: dict[str, Any]) -> dict[str, Any]:
    concurrency = max(1, min(batch, int(options.get("procrastinate_max_concurrency", 20))))
    return {
        "concurrency": concurrency,
        "pool_max_size": concurrency + 1,
        "delete_jobs": "always",
        "wait": False,
        "listen_notify": True,
    }


async def trial(dsn: str, rows: int, batch: int, options: dict[str, Any]) -> dict[str, Any]:
    import procrastinate

    used = settings(batch, options)
    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=dsn, min_size=1, max_size=used["pool_max_size"]
        )
    )

    @app.task(name="noop", queue="bench")
    async def noop() -> None:
        return None

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        started = time.perf_counter()
        for offset in range(0, rows, ENQUEUE_CHUNK):
            k = min(ENQUEUE_CHUNK, rows - offset)
            await noop.batch_defer_async(*({} for _ in range(k)))
        enqueue_s = time.perf_counter() - started
        await settle(dsn, "procrastinate_jobs")

        started = time.perf_counter()
        await app.run_worker_async(
            queues=["bench"],
            concurrency=used["concurrency"],
            wait=False,
            delete_jobs="always",
            install_signal_handlers=False,
        )
        drain_s = time.perf_counter() - started
    return {
        "enqueue_s": enqueue_s,
        "drain_s": drain_s,
        "remaining": await count(dsn, "procrastinate_jobs"),
        "settings": used,
    }
