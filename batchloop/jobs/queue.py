"""A queue's loop: the batchloop name ``jobs:<queue>``, with the work query and worker below.

The work query counts the queue's live leases and finds due jobs (pending with ``run_at``
passed, or running with an expired lease) up to the free slots of ``concurrency``; one loop
per queue across the cluster makes that limit global by construction. With nothing to lease it
returns ``Idle(timeout=...)`` until the next ``run_at``, lease expiry or retention sweep, so
delayed jobs need no ping. The worker leases the batch in the loop's transaction (one
statement), and once that commits (:func:`batchloop.runtime.outcome.on_outcome`) the host's
runner starts the handlers, outside any transaction.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import batchloop as bl

from ..calls import ping_args
from ..drivers import session_for
from ..runtime.host import Host, current_host
from ..runtime.outcome import on_outcome
from .model import FINAL, from_row
from .registry import queue_settings, types_of

log = logging.getLogger("batchloop")

PREFIX = "jobs:"
SWEEP_BATCH = 1000
"""Finished jobs deleted per statement: a sweep never holds many row locks at once."""
SWEEP_CHECK = 30.0
"""While the queue is busy, how often (seconds) its loop checks for jobs past retention."""
BLOCKED_PAUSE = 0.05
"""Due jobs all locked by other transactions (a cancel in flight): pause rather than spin."""
COOLDOWN = 1.0
POLL = 0.05
AT_CAPACITY_POLL = 0.2
"""Every slot taken: this host's completions wake the loop at once; others' within this."""

_sweep_checked: dict[tuple[str, str], float] = {}
"""(host_id, queue): when the busy queue's loop next looks for jobs past retention."""


def forget_host(host_id: str) -> None:
    """The host exited: drop what its loops remembered."""
    for key in [key for key in _sweep_checked if key[0] == host_id]:
        del _sweep_checked[key]


def queue_name(queue: str) -> str:
    """The batchloop name of a job queue's loop."""
    return PREFIX + queue


@dataclass(frozen=True, slots=True)
class Due:
    """A batch: jobs to lease (or to record as canceled), and whether to sweep old jobs."""

    queue: str
    ids: list[int]
    sweep: bool = False


def _host(queue: str) -> Host:
    host = current_host()
    if host is None:
        raise RuntimeError(
            f"job queue {queue!r} runs only in a batchloop Host (handlers start after the "
            "lease commits, on the host's pool), not under tick or testing.drain"
        )
    return host


def _types(queue: str) -> list[str]:
    types = types_of(queue)
    if not types:
        raise RuntimeError(
            f"job queue {queue!r}: this process registers no job type of it; run the hosts "
            "with the module that defines them (Host(dsn, modules=[...]))"
        )
    return types


async def next_jobs(conn: Any, name: str) -> bl.Work[Due] | bl.Idle:
    """What every job queue's work query does (see :func:`callables_for`)."""
    queue = name.removeprefix(PREFIX)
    host = _host(queue)
    types = _types(queue)
    settings = queue_settings(queue)
    async with session_for(conn, host.schema) as s:
        row = await s.fetchrow("jobs_due", queue, types, settings.concurrency)
        assert row is not None
        ids = [*row["due"], *row["ending"]]
        now = time.monotonic()
        if now < _sweep_checked.get((host.host_id, queue), 0.0):
            if ids:
                return bl.Work(Due(queue, ids))
            if row["busy"] >= settings.concurrency:
                return _at_capacity(row["expiry_in"])
        times = await s.fetchrow("jobs_next", queue, types, settings.retention)
        assert times is not None
    run_in, expiry_in, sweep_in = times["run_in"], times["expiry_in"], times["sweep_in"]
    sweep = sweep_in is not None and sweep_in <= 0
    next_check = SWEEP_CHECK if sweep_in is None else min(SWEEP_CHECK, sweep_in)
    _sweep_checked[host.host_id, queue] = now + next_check
    if ids or sweep:
        return bl.Work(Due(queue, ids, sweep))
    if row["busy"] >= settings.concurrency:
        return _at_capacity(expiry_in)
    soonest = [t for t in (run_in, expiry_in, sweep_in) if t is not None]
    timeout = max(0.01, min(soonest)) if soonest else None
    return bl.Idle(timeout=timeout, cooldown=COOLDOWN, poll_interval=POLL)


def _at_capacity(expiry_in: float | None) -> bl.Idle:
    """Every slot taken: wait for a completion (this host's runner pokes the loop; another's
    ping wakes it once it sleeps) or for the first lease to expire."""
    timeout = max(0.01, expiry_in) if expiry_in is not None else None
    return bl.Idle(timeout=timeout, cooldown=COOLDOWN, poll_interval=AT_CAPACITY_POLL)


async def lease_jobs(conn: Any, batch: Due) -> bl.Debounce | None:
    """What every job queue's worker does: lease, record cancels, sweep."""
    from .runner import call_on_complete, runtime_of

    host = _host(batch.queue)
    runtime = runtime_of(host)
    started = []
    async with session_for(conn, host.schema) as s:
        rows = await s.fetch("jobs_lease", batch.ids) if batch.ids else []
        for row in rows:
            if row["status"] == "running":
                started.append(row)
            elif row["status"] in FINAL:
                await call_on_complete(conn, from_row(row))
        if batch.sweep:
            retention = queue_settings(batch.queue).retention
            gone = await s.fetchval("jobs_sweep", batch.queue, retention, SWEEP_BATCH)
            if gone:
                log.debug("job queue %r: deleted %d finished jobs", batch.queue, gone)
                if gone >= SWEEP_BATCH:
                    # More to go: look again at the next iteration.
                    _sweep_checked.pop((host.host_id, batch.queue), None)
    if started:
        # Not committed may also mean "outcome unknown" (the connection broke during COMMIT):
        # the runner then looks the lease up and starts what did commit.
        on_outcome(
            lambda committed: runtime.start(started) if committed else runtime.verify(started)
        )
    if batch.ids and not rows:
        return bl.Debounce(BLOCKED_PAUSE)
    return None


Callables = tuple[Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]]


@cache
def callables_for(queue: str) -> Callables:
    """The queue's own work query and worker, registered in this process once one of its job
    types is: a host whose process defines no type of a queue lacks them, so it never claims
    the queue's loop (the registry rule), and leaves it to a host that has them.

    Both are module-level attributes of this module, named after the queue
    (``batchloop.jobs.queue:jobs_<queue>_<hash>_query``), and call :func:`next_jobs` and
    :func:`lease_jobs`."""
    stem = "jobs_" + re.sub(r"\W", "_", queue)[:40] + "_"
    stem += hashlib.sha1(queue.encode()).hexdigest()[:8]

    async def query(conn: Any, name: str) -> bl.Work[Due] | bl.Idle:
        return await next_jobs(conn, name)

    async def worker(conn: Any, batch: Due) -> bl.Debounce | None:
        return await lease_jobs(conn, batch)

    for func, suffix in ((query, "_query"), (worker, "_worker")):
        func.__name__ = func.__qualname__ = stem + suffix
        func.__module__ = __name__
        globals()[func.__name__] = func
    return bl.work_query(query), bl.worker(worker)


async def wake_queue(conn: Any, queue: str, schema: str) -> None:
    """Ping the queue's loop in the caller's transaction (free while it runs: no write)."""
    query, worker = callables_for(queue)
    await bl.ping(conn, queue_name(queue), query, worker, schema=schema)


@cache
def ping_of(queue: str) -> tuple[Any, ...]:
    """The arguments of the ``ping`` function for the queue's loop (jobs_complete sends one)."""
    return ping_args(queue_name(queue), *callables_for(queue), None)
