"""A standalone host process for fault tests: ``python run_host.py DSN``.

Knobs for the shared ``jobs`` callables come from the environment (JOBS_LIMIT, JOBS_SLEEP,
JOBS_COOLDOWN). Prints ``ready <host_id>`` once the host runs, then serves until killed.
Optional ``Host`` knobs, each left at the library default when unset: HOST_STARTUP_TIMEOUT
(seconds, or ``none`` to retry for ever), HOST_POOL_MAX, HOST_MONITOR_INTERVAL (seconds);
HOST_LOG_LEVEL sets the ``batchloop`` logger's level (e.g. DEBUG; default: WARNING).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

import batchloop as bl

import jobs


async def main(dsn: str) -> None:
    defaults = jobs.Knobs(
        limit=int(os.environ.get("JOBS_LIMIT", "100")),
        sleep=float(os.environ.get("JOBS_SLEEP", "0")),
        idle=bl.Idle(cooldown=float(os.environ.get("JOBS_COOLDOWN", "0.3")), poll_interval=0.05),
    )
    jobs.KNOBS.clear()
    jobs.KNOBS.update({name: defaults for name in os.environ.get("JOBS_NAMES", "").split(",")})
    async with bl.Host(dsn, modules=["jobs"], **host_kwargs()) as host:
        print("ready", host.host_id, flush=True)
        await asyncio.Event().wait()


def host_kwargs() -> dict[str, Any]:
    """``Host`` arguments from the HOST_* environment variables; none set: library defaults."""
    kwargs: dict[str, Any] = {}
    startup = os.environ.get("HOST_STARTUP_TIMEOUT")
    if startup is not None:
        kwargs["startup_timeout"] = None if startup.strip().lower() == "none" else float(startup)
    pool_max = os.environ.get("HOST_POOL_MAX")
    if pool_max is not None:
        kwargs["pool_max_size"] = int(pool_max)
        kwargs["pool_min_size"] = min(1, int(pool_max))
    monitor = os.environ.get("HOST_MONITOR_INTERVAL")
    if monitor is not None:
        kwargs["monitor_interval"] = float(monitor)
    return kwargs


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("batchloop").setLevel(os.environ.get("HOST_LOG_LEVEL", "WARNING"))
    asyncio.run(main(sys.argv[1]))
