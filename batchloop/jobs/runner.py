"""A host's job runner: handlers as asyncio tasks, completions in batches, lease extension.

One :class:`Runtime` per running Host, made at the first lease. Leases commit in the queue
loop's transaction (:mod:`batchloop.jobs.queue`); only then does :meth:`Runtime.start` create
the handlers' tasks. No transaction stays open while a handler runs. Finished attempts queue up
and a single flusher records them, as many as have finished, in one fenced statement
(``jobs_complete``), runs ``on_complete`` for each row that statement moved to a final state,
re-pings the queues (free while their loops run) in that same transaction, and then pokes this
host's loops so they lease the freed slots at once; a queue's loop that gets to them first
(:meth:`Runtime.take`) records them itself, in the transaction leasing their slots again. An
extender renews the leases of running attempts, one statement for all of them, a third of the
way into each lease. A lease whose COMMIT went unanswered is looked up (:meth:`Runtime.verify`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from ..drivers import session_for
from ..runtime.host import Host
from .context import JobContext
from .model import FINAL, JobRun, from_row
from .outcomes import backoff, bad_value, describe, encode_result, storable
from .registry import JobSpec, NonRetryable, lookup

log = logging.getLogger("batchloop")

FLUSH_MAX = 1000
"""Completions recorded per statement."""
EXTEND_TICK_MAX = 1.0
RECORD_RETRY_MAX = 5.0
NO_PING = (None,) * 6
"""The ping arguments of ``jobs_complete`` when the queue's own loop records (it runs)."""
KEEP_CONNECTION = 0.05
"""How long the flusher keeps its pool connection with nothing to record (seconds)."""


@dataclass(eq=False, slots=True)
class Attempt:
    """One leased attempt running in this process."""

    runtime: Runtime
    spec: JobSpec
    id: int
    attempt: int
    max_attempts: int
    lease: float
    payload: Any
    extended_at: float = field(default_factory=time.monotonic)
    cancel_seen: bool = False
    lost: bool = False
    task: asyncio.Task[None] | None = None


@dataclass(eq=False, slots=True)
class Taken:
    """Completions a queue's loop took to record in its own transaction (before leasing the
    slots they free): given back to the flusher unless that transaction records them."""

    completions: list[Completion]
    recorded: bool = False
    returned: bool = False


@dataclass(frozen=True, slots=True)
class Completion:
    attempt: Attempt
    outcome: str
    """'ok', 'retry' (attempts permitting) or 'fail' (at once)."""
    result: str | None = None
    error: str | None = None
    delay: float = 0.0


async def call_on_complete(conn: Any, run: JobRun) -> None:
    """The job type's ``on_complete``, in a savepoint of the transaction recording ``run``'s
    final state. If it raises, its writes are rolled back and the error logged; the state is
    recorded all the same (it was called, once, in that transaction)."""
    spec = lookup(run.type)
    if spec is None or spec.on_complete is None:
        return
    try:
        async with conn.transaction():
            await spec.on_complete(conn, run)
    except Exception:
        log.exception(
            "job %d (%s): on_complete raised; its writes were rolled back", run.id, run.type
        )


_runtimes: weakref.WeakKeyDictionary[Host, Runtime] = weakref.WeakKeyDictionary()


def runtime_of(host: Host) -> Runtime:
    """The host's runner, made (and hooked to the host's exit) on first use."""
    runtime = _runtimes.get(host)
    if runtime is None:
        runtime = _runtimes[host] = Runtime(host)
        host.on_close(runtime.close)
    return runtime


class Runtime:
    """The jobs side of one Host: its running attempts, their completions and leases."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.schema = host.schema
        self.attempts: dict[tuple[int, int], Attempt] = {}
        self.done: list[Completion] = []
        self._have = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._extender: asyncio.Task[None] | None = None
        self._held: tuple[contextlib.AbstractAsyncContextManager[Any], Any] | None = None
        self._verifying: set[asyncio.Task[None]] = set()
        self._solo: set[tuple[int, int]] = set()
        """Attempts the loop failed to record: left to the flusher."""
        self._flushing = False
        """A flush is under way (the runner is not idle even with nothing queued)."""

    # ------------------------------------------------------------------ handlers

    def start(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """The leases of ``rows`` committed: start their handlers (called by the loop)."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_forever(), name="batchloop-jobs-flush")
            self._extender = asyncio.create_task(
                self._extend_forever(), name="batchloop-jobs-extend"
            )
        for row in rows:
            spec = lookup(row["type"])
            if spec is None:  # pragma: no cover - the work query leases only registered types
                continue
            attempt = Attempt(
                self,
                spec,
                row["id"],
                row["attempts"],
                row["max_attempts"],
                float(row["lease_seconds"]),
                row["payload"],
            )
            self.attempts[attempt.id, attempt.attempt] = attempt
            attempt.task = asyncio.create_task(self._run(attempt))

    def verify(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """The lease of ``rows`` did not commit, or its outcome is unknown: start the
        handlers of whatever it did commit (nothing, after a plain rollback)."""
        task = asyncio.create_task(self._verify(rows), name="batchloop-jobs-verify")
        self._verifying.add(task)
        task.add_done_callback(self._verifying.discard)

    async def _verify(self, rows: Sequence[Mapping[str, Any]]) -> None:
        # Until the lease would have expired anyway: after that the job is due again.
        deadline = time.monotonic() + min(float(r["lease_seconds"]) for r in rows)
        pause = 0.05
        while True:
            try:
                async with self.host.lend() as conn, session_for(conn, self.schema) as s:
                    found = await s.fetch(
                        "jobs_leased",
                        [r["id"] for r in rows],
                        [r["attempts"] for r in rows],
                        [r["started_at"] for r in rows],
                    )
                break
            except Exception as exc:
                if time.monotonic() + pause >= deadline or self.closing:
                    log.warning("jobs: cannot tell whether a lease committed (%s)", exc)
                    return
                await asyncio.sleep(pause)
                pause = min(1.0, pause * 2)
        ours = {row["id"] for row in found}
        if ours and not self.closing:
            log.warning(
                "jobs: a lease's COMMIT went unanswered but committed; starting %d jobs",
                len(ours),
            )
            self.start([row for row in rows if row["id"] in ours])

    async def _run(self, a: Attempt) -> None:
        try:
            raw = a.payload
            payload = (
                a.spec.adapter.validate_json(raw)
                if isinstance(raw, str | bytes)
                else a.spec.adapter.validate_python(raw)
            )
        except pydantic.ValidationError as exc:
            error = f"the payload no longer validates against job {a.spec.type!r}: {exc}"
            self._finish(Completion(a, "fail", error=storable(error)))
            return
        except Exception as exc:  # e.g. an annotation that never resolves
            self._finish(Completion(a, "fail", error=describe(exc)))
            return
        try:
            result = await a.spec.handler(JobContext(a), payload)
            text = encode_result(result)
        except NonRetryable as exc:
            self._finish(Completion(a, "fail", error=describe(exc)))
        except Exception as exc:
            log.warning(
                "job %d (%s) attempt %d of %d failed: %s",
                a.id,
                a.spec.type,
                a.attempt,
                a.max_attempts,
                exc,
                exc_info=exc,
            )
            delay = backoff(a.attempt, random.random())
            self._finish(Completion(a, "retry", error=describe(exc), delay=delay))
        else:
            self._finish(Completion(a, "ok", result=text))

    def take(self, queue: str) -> Taken:
        """This queue's finished attempts that no flush has taken yet, for the loop."""
        mine = [
            c
            for c in self.done
            if c.attempt.spec.queue == queue and (c.attempt.id, c.attempt.attempt) not in self._solo
        ][:FLUSH_MAX]
        if mine:
            taken = {id(c) for c in mine}
            self.done = [c for c in self.done if id(c) not in taken]
            if not self.done and not self._flushing:
                self._idle.set()
        return Taken(mine)

    def give_back(self, taken: Taken, *, solo: bool = False) -> None:
        """The loop did not record them: the flusher will (``solo``: and the loop leaves
        them to it, since recording them in the loop failed)."""
        if taken.returned or not taken.completions:
            return
        taken.returned = True
        if solo:
            self._solo.update((c.attempt.id, c.attempt.attempt) for c in taken.completions)
        self.done[:0] = taken.completions
        self._idle.clear()
        self._have.set()

    def settle(self, taken: Taken, committed: bool) -> None:
        """The loop's transaction ended: forget what it recorded, or give it back."""
        if taken.recorded and committed:
            for c in taken.completions:
                self._forget(c.attempt)
        else:
            self.give_back(taken)

    async def record_in(self, conn: Any, taken: Taken) -> None:
        """Record ``taken`` in the caller's transaction (the loop's), in a savepoint: a value
        the server refuses gives them back to the flusher, which records them one by one."""
        if not taken.completions:
            return
        try:
            async with conn.transaction():
                rows = await self._complete(conn, taken.completions, NO_PING)
        except Exception as exc:
            if not bad_value(exc):
                raise
            self.give_back(taken, solo=True)
            return
        self._report_stale(taken.completions, rows)
        taken.recorded = True

    def _finish(self, completion: Completion) -> None:
        self.done.append(completion)
        self._idle.clear()
        self._have.set()

    # ------------------------------------------------------------------ completions

    async def _flush_forever(self) -> None:
        while True:
            if self._held is not None and not self._have.is_set():
                # Idle a moment: the connection goes back, so even a pool of one connection
                # is never kept from the loops.
                try:
                    await asyncio.wait_for(self._have.wait(), KEEP_CONNECTION)
                except asyncio.TimeoutError:
                    await self._drop_connection()
            await self._have.wait()
            self._have.clear()
            # Let the handlers already scheduled finish too: they join this flush (unless the
            # queue's loop, iterating meanwhile, took them to record with its next lease).
            await asyncio.sleep(0)
            try:
                await self.flush()
            except Exception:  # pragma: no cover - a bug here must not stop the flusher
                log.exception("jobs: the completion flusher failed; going on")
                self._have.set()
                await asyncio.sleep(1.0)

    async def flush(self) -> None:
        """Record every finished attempt queued so far, one statement per queue."""
        self._flushing = True
        try:
            while self.done:
                queue = self.done[0].attempt.spec.queue
                batch = [c for c in self.done if c.attempt.spec.queue == queue][:FLUSH_MAX]
                taken = {id(c) for c in batch}
                self.done = [c for c in self.done if id(c) not in taken]
                await self._record_with_retries(batch)
        finally:
            self._flushing = False
        self._idle.set()

    async def _record_with_retries(self, batch: list[Completion]) -> None:
        pause = 0.05
        while True:
            try:
                await self._record(batch)
                return
            except Exception as exc:
                if bad_value(exc):
                    await self._record_apart(batch, exc)
                    return
                await self._drop_connection()
                if self.closing and pause >= RECORD_RETRY_MAX:
                    log.error("jobs: cannot record %d completions (%s); giving up", len(batch), exc)
                    return
                log.warning("jobs: recording %d completions failed (%s); retrying", len(batch), exc)
                await asyncio.sleep(pause)
                pause = min(RECORD_RETRY_MAX, pause * 2)

    async def _record_apart(self, batch: list[Completion], exc: Exception) -> None:
        """A statement error: record them one by one, so one bad value fails one job only."""
        if len(batch) > 1:
            for one in batch:
                await self._record_with_retries([one])
            return
        (one,) = batch
        if one.outcome == "fail" and (one.error or "").startswith("could not record"):
            log.error("job %d: cannot record its failure either (%s)", one.attempt.id, exc)
            self._forget(one.attempt)
            return
        error = storable(f"could not record the attempt's outcome: {describe(exc)}")
        await self._record_with_retries([Completion(one.attempt, "fail", error=error)])

    async def _connection(self) -> Any:
        """The flusher's pool connection, kept while completions keep coming: no pool round
        trip per flush."""
        if self._held is None:
            lease = self.host.lend()
            self._held = (lease, await lease.__aenter__())
        return self._held[1]

    async def _drop_connection(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            with contextlib.suppress(Exception):
                await held[0].__aexit__(None, None, None)

    async def _record(self, batch: list[Completion]) -> None:
        """One queue's completions, with their on_complete calls and the queue's ping."""
        from .queue import ping_of, queue_name

        queue = batch[0].attempt.spec.queue
        conn = await self._connection()
        if any(c.attempt.spec.on_complete is not None for c in batch):
            async with conn.transaction():
                rows = await self._complete(conn, batch, ping_of(queue))
        else:
            # One statement needs no transaction of its own.
            rows = await self._complete(conn, batch, ping_of(queue))
        self._report_stale(batch, rows)
        for c in batch:
            self._forget(c.attempt)
        self.host.poke(queue_name(queue))

    async def _complete(
        self, conn: Any, batch: list[Completion], ping: tuple[Any, ...]
    ) -> Sequence[Mapping[str, Any]]:
        """``jobs_complete`` for ``batch``, then on_complete for each row it made final."""
        async with session_for(conn, self.schema) as s:
            rows = await s.fetch(
                "jobs_complete",
                [c.attempt.id for c in batch],
                [c.attempt.attempt for c in batch],
                [c.outcome for c in batch],
                [c.result for c in batch],
                [c.error for c in batch],
                [c.delay for c in batch],
                *ping,
            )
        for row in rows:
            if row["status"] in FINAL and row["on_complete"]:
                await call_on_complete(conn, from_row(row))
        return rows

    def _report_stale(self, batch: list[Completion], rows: Sequence[Mapping[str, Any]]) -> None:
        if len(rows) == len(batch):
            return
        recorded = {row["id"] for row in rows}
        for c in batch:
            if c.attempt.id not in recorded:
                log.info(
                    "job %d (%s) attempt %d: its lease was lost, so its outcome (%s) is "
                    "dropped; a newer attempt decides",
                    c.attempt.id,
                    c.attempt.spec.type,
                    c.attempt.attempt,
                    c.outcome,
                )

    def _forget(self, a: Attempt) -> None:
        if self.attempts.get((a.id, a.attempt)) is a:
            del self.attempts[a.id, a.attempt]
        self._solo.discard((a.id, a.attempt))

    # ------------------------------------------------------------------ leases

    async def _extend_forever(self) -> None:
        while True:
            leases = [a.lease for a in self.attempts.values()]
            await asyncio.sleep(min([EXTEND_TICK_MAX, *(lease / 6 for lease in leases)]))
            try:
                await self.extend()
            except Exception as exc:
                log.warning("jobs: extending leases failed: %s", exc)

    async def extend(self) -> None:
        """Renew the leases a third of the way (or more) into them, in one statement."""
        now = time.monotonic()
        due = [
            a for a in self.attempts.values() if not a.lost and now - a.extended_at >= a.lease / 3
        ]
        if not due:
            return
        async with self.host.lend() as conn, session_for(conn, self.schema) as s:
            rows = await s.fetch("jobs_extend", [a.id for a in due], [a.attempt for a in due])
        ours = {row["id"]: row["cancel_requested"] for row in rows}
        for a in due:
            if a.id in ours:
                a.extended_at = now
                a.cancel_seen = a.cancel_seen or bool(ours[a.id])
            elif (a.id, a.attempt) in self.attempts and not self._finished(a):
                a.lost = True
                log.warning(
                    "job %d (%s) attempt %d lost its lease; ctx.cancelled() now says True",
                    a.id,
                    a.spec.type,
                    a.attempt,
                )

    def _finished(self, a: Attempt) -> bool:
        return a.task is not None and a.task.done()

    async def progress(self, a: Attempt, percent: int) -> None:
        if a.lost:
            return
        async with self.host.lend() as conn, session_for(conn, self.schema) as s:
            row = await s.fetchrow("jobs_progress", a.id, a.attempt, percent)
        if row is None:
            a.lost = True
        else:
            a.cancel_seen = a.cancel_seen or bool(row["cancel_requested"])

    async def cancelled(self, a: Attempt) -> bool:
        if a.cancel_seen or a.lost:
            return True
        async with self.host.lend() as conn, session_for(conn, self.schema) as s:
            flag = await s.fetchval("jobs_cancel_requested", a.id, a.attempt)
        if flag is None:
            a.lost = True
        else:
            a.cancel_seen = bool(flag)
        return a.cancel_seen or a.lost

    # ------------------------------------------------------------------ shutdown

    async def close(self, grace: float) -> None:
        """The host is exiting (its loops drained: nothing new starts): let the handlers
        finish within ``grace``, cancel the rest and hand their jobs back at once."""
        self.closing = True
        tasks = [a.task for a in self.attempts.values() if a.task is not None and not a.task.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        try:
            if self._flusher is not None:
                self._have.set()
                try:
                    await asyncio.wait_for(self._idle.wait(), timeout=max(grace, 1.0))
                except asyncio.TimeoutError:
                    log.error("jobs: %d completions not recorded at shutdown", len(self.done))
            given_up = [a for a in self.attempts.values() if self._finished(a) and not a.lost]
            given_up = [a for a in given_up if a.task is not None and a.task.cancelled()]
            if given_up:
                async with self.host.lend() as conn, session_for(conn, self.schema) as s:
                    await s.fetch(
                        "jobs_release", [a.id for a in given_up], [a.attempt for a in given_up]
                    )
                log.warning("jobs: handed back %d unfinished jobs at shutdown", len(given_up))
        finally:
            helpers = [t for t in (self._flusher, self._extender) if t is not None]
            helpers += self._verifying
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            await self._drop_connection()
            _runtimes.pop(self.host, None)
            from .queue import forget_host

            forget_host(self.host.host_id)
