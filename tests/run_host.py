"""A standalone host process for fault tests: ``python run_host.py DSN``.

Knobs for the shared ``jobs`` callables come from the environment (JOBS_LIMIT, JOBS_SLEEP,
JOBS_COOLDOWN). Prints ``ready <host_id>`` once the host runs, then serves until killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

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
    async with bl.Host(dsn, modules=["jobs"]) as host:
        print("ready", host.host_id, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(sys.argv[1]))
