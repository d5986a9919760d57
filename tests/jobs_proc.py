"""A host process running the job types of tests/jobs_core.py: ``python jobs_proc.py DSN``.

Prints ``ready <host_id>`` once the host runs, then serves until killed. JOBS_BLOCK=1 makes
``t.sticky`` handlers block for ever (to kill the process mid-job). JOBS_MODULES (default
``jobs_core``; empty: none) names the host's modules; batchloop.jobs is imported either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import batchloop as bl
import batchloop.jobs


async def main(dsn: str) -> None:
    modules = [m for m in os.environ.get("JOBS_MODULES", "jobs_core").split(",") if m]
    async with bl.Host(dsn, modules=modules) as host:
        print("ready", host.host_id, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(main(sys.argv[1]))
