"""One name's loop on its owning host: sleep, run one iteration transaction, decide, repeat.

Each iteration is a single transaction on a pool connection, READ COMMITTED:

1. ``book_batch`` (sent with ``BEGIN``): the fence and the batch's bookkeeping in one write. It
   matches only while the generation is still ours, the callables are the ones we loaded, the
   worker runs and no stop is waiting; its row lock then holds claims and stops off until we
   end. No match sends us to the full ``fence``, which tells superseded (leave without
   writing), new callables (reload) and a due wake-up apart.
2. Run the work query; on ``Work`` run the worker, then commit.
3. On ``Idle`` within the cooldown: put the bookkeeping back (``unbook_batch``, sent with
   ``COMMIT``) and poll again later. Past the cooldown: take the name's wake lock exclusively
   (``try_go_idle``: it fails while any ping transaction is in flight, and then we poll again),
   re-run the query with a fresh snapshot, and only if it still says idle, write idle or
   waiting (which also puts the bookkeeping back).

The worker's writes and the bookkeeping commit together or not at all. A failure rolls the
iteration back, then records the failure in a transaction of its own and retries with backoff.
The decisions themselves are pure functions in :mod:`batchloop.runtime.decide`; the round-trip
economy is each driver's (:class:`batchloop.drivers.base.Iteration`).
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Sized
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

import anyio

from .. import observe
from ..connect import server_id
from ..drivers.asyncpg import AsyncpgLoopDriver
from ..drivers.base import LoopDriver, Row, Session
from ..drivers.errors import connection_lost
from ..errors import Superseded, TransactionAborted
from ..models import Config, Debounce, Idle, Work
from ..observe import logs as observe_logs
from ..observe import tracing
from ..registry import Registered, lookup
from ..status import parse_config
from . import decide
from .decide import Decision, RunAgain, Sleep
from .iteration import CLEANUP_TIMEOUT

log = logging.getLogger("batchloop")


END_BACKEND_TIMEOUT = 5.0
"""How long a loop tries to end the backend of a connection it lost mid-statement."""


def storable(text: str) -> str:
    """``text`` as PostgreSQL ``text`` accepts it, visibly escaped where it would not: a NUL,
    or a lone surrogate (no UTF-8 form). Either would make the server (or the driver) refuse
    the whole statement, and the failure would go unrecorded."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def abandon(conn: Any) -> None:
    """Close a connection at once, without a word to a server that does not answer."""
    try:
        if hasattr(conn, "terminate"):  # asyncpg (a pool proxy forwards it)
            conn.terminate()
        elif getattr(conn, "pgconn", None) is not None:  # psycopg
            conn.pgconn.finish()
    except Exception as exc:
        log.debug("abandoning a connection failed: %r", exc)


class CallableMissing(Exception):
    """A row names a callable this process did not register."""


@dataclass(slots=True)
class Bound:
    """The callables and config a loop runs with, at one ``workers.revision``."""

    revision: int
    query: Registered
    worker: Registered
    config: Config

    @classmethod
    def from_row(cls, row: Row) -> Bound:
        query = lookup(row["work_query"], "work_query")
        worker = lookup(row["worker"], "worker")
        if query is None or worker is None:
            missing = row["work_query"] if query is None else row["worker"]
            raise CallableMissing(f"{missing} is not registered in this process")
        config = row["config"]
        parsed = _config(config) if isinstance(config, str) else parse_config(config)
        return cls(row["revision"], query, worker, parsed)


def _empty(batch: object) -> bool:
    """A batch with nothing in it: a sized value of length 0 (anything unsized is not)."""
    return isinstance(batch, Sized) and len(batch) == 0


@lru_cache(maxsize=1024)
def _config(text: str) -> Config:
    """A stored config, parsed once per text: claims are on the wake-up's critical path, and a
    Config is immutable, so loops may share one."""
    return parse_config(text)


class ConnectionSource(Protocol):
    """An asyncpg Pool, or anything else that lends connections the same way."""

    def acquire(self) -> AbstractAsyncContextManager[Any]: ...


@dataclass(slots=True)
class LoopContext:
    """What a loop needs from its host."""

    pool: ConnectionSource
    schema: str
    release: Callable[[NameLoop], Awaitable[None]]
    driver: LoopDriver = field(default_factory=AsyncpgLoopDriver)
    """The client library of ``pool``'s connections, which the user's callables get."""
    prepare: bool = False
    """Keep ``book_batch`` prepared on each connection (not behind a transaction pooler)."""
    application_name: str | None = None
    """The host's, on every connection it opens: lets a loop end the server side of a
    connection it lost mid-statement, and only that (None: never try)."""
    in_flight: dict[int, str | None] = field(default_factory=dict)
    """Server pids of connections inside an iteration, each with the server it is on
    (:func:`batchloop.connect.server_id`): if the host loses its session, these may be zombies
    still holding row locks, and it ends them before claiming again (on that server only: after
    a failover the same pid on the new primary is some other backend)."""


@dataclass(slots=True)
class NameLoop:
    ctx: LoopContext
    name: str
    generation: int
    lock_key: int
    stop_key: int
    bound: Bound
    failures: int
    first_delay: float
    poke: anyio.Event = field(default_factory=anyio.Event)
    stopping: bool = False
    busy: bool = False
    unrunnable: bool = False
    once: bool = False
    """A tick's drain pass: no cooldown polling, stop at the first failure or sleep."""
    deadline: float | None = None
    """A tick's budget end (``anyio.current_time()``): no iteration starts after it."""
    outcome: str = "cancelled"
    """Why run() returned: idle, waiting, superseded, failed, stopped, unrunnable, budget,
    cancelled."""
    batches: int = 0
    warned_empty: bool = False
    """Whether this loop has logged that its work query returned an empty batch."""
    last_error: str | None = None
    items: int | None = None
    """``len()`` of the last batch processed (None: unsized), for the observers."""
    worked_at: float = 0.0
    """``anyio.current_time()`` of the last batch or wake, for the cooldown: set from the
    database's ``since_work`` at the claim and at every re-arm, then by our own batches."""
    _lost: bool = False
    """The last iteration's connection broke: its failure is a connection loss, whatever
    exception the driver raised for it."""
    _held: tuple[AbstractAsyncContextManager[Any], Any] | None = None
    """A pool connection kept between iterations that follow each other without a pause,
    which spares a pool round trip (asyncpg resets connections on release) per batch."""

    @classmethod
    def claimed(
        cls, ctx: LoopContext, name: str, row: Row, bound: Bound, **options: Any
    ) -> NameLoop:
        """The loop for a name just claimed; ``row`` is what ``claim()`` returned."""
        return cls(
            ctx=ctx,
            name=name,
            generation=row["generation"],
            lock_key=row["lock_key"],
            stop_key=row["stop_key"],
            bound=bound,
            failures=row["consecutive_failures"],
            first_delay=row["run_in"],
            worked_at=anyio.current_time() - row["since_work"],
            **options,
        )

    def wake(self) -> None:
        """Cut the current sleep short (a ping woke us, or the host is shutting down)."""
        self.poke.set()

    async def run(self) -> None:
        """Run until superseded, idle, stopped or cancelled; then release the name."""
        # Every log record made in this loop, the user's callables' included, is about it.
        context = observe_logs.enter(self.name, self.generation)
        try:
            delay = self.first_delay
            while not self.stopping:
                if self.deadline is not None and anyio.current_time() + delay >= self.deadline:
                    self.outcome = "budget"
                    break
                if delay > 0:
                    await self._put_back()  # keep a connection only while draining
                if delay > 0 and await self._sleep(delay):
                    if self.stopping:
                        break
                    fresh = await self._rearm()
                    if fresh is None:
                        self.outcome = "stopped"
                        break
                    delay = fresh
                    continue
                self.busy = True
                try:
                    decision = await self._iterate_or_fail()
                finally:
                    self.busy = False
                if decision is None:
                    break
                if isinstance(decision, Sleep):
                    self.outcome = decision.state
                    if decision.timeout is None or self.once:
                        break
                    delay = decision.timeout
                else:
                    delay = decision.delay
            else:
                self.outcome = "stopped"
        finally:
            with anyio.CancelScope(shield=True):
                await self._put_back()
                await self.ctx.release(self)
            observe_logs.current.reset(context)

    async def _sleep(self, delay: float) -> bool:
        """Sleep; True if poked before the delay ran out."""
        with anyio.move_on_after(delay):
            await self.poke.wait()
            self.poke = anyio.Event()
            return True
        return False

    async def _rearm(self) -> float | None:
        """After a poke: how long until we should run, per the database (None: give up)."""
        try:
            async with self.ctx.pool.acquire() as conn:
                row = await self.ctx.driver.session(conn, self.ctx.schema).fetchrow(
                    "run_in", self.name, self.generation
                )
        except Exception as exc:
            log.warning("loop %r: re-reading its state failed (%s); running now", self.name, exc)
            return 0.0  # the iteration's fence decides, and its failure path backs off
        if row is None or row["status"] in ("idle", "stopped"):
            return None
        self.worked_at = anyio.current_time() - row["since_work"]  # a ping's wake counts
        return float(row["run_in"])

    async def _iterate_or_fail(self) -> Decision | None:
        started, batches = time.perf_counter(), self.batches
        with tracing.iteration_span(self.name, self.generation) as span:
            try:
                decision = await self._iterate()
            except Superseded:
                log.info("loop %r generation %d superseded", self.name, self.generation)
                self.outcome = "superseded"
                self._observed(span, started, "superseded")
                return None
            except CallableMissing as exc:
                log.error("loop %r: %s; releasing it to a host that has it", self.name, exc)
                self.unrunnable = True
                self.outcome = "unrunnable"
                self._observed(span, started, "unrunnable")
                return None
            except Exception as exc:
                self._observed(span, started, "failed", exc)
                retry = await self._failed(exc)
                if self.once:
                    self.outcome = "failed"
                    return None
                return retry
            if isinstance(decision, Sleep):
                self._observed(span, started, "idle" if decision.timeout is None else "waiting")
            else:
                self._observed(span, started, "committed" if self.batches > batches else "polled")
            return decision

    def _observed(
        self, span: Any, started: float, outcome: observe.Outcome, exc: Exception | None = None
    ) -> None:
        """Report an iteration's end to the tracer and the observers (if any)."""
        tracing.outcome(span, outcome, exc)
        if observe.observers:
            context = observe_logs.current.get()
            observe.emit_iteration(
                observe.IterationEvent(
                    self.name,
                    self.generation,
                    context.host if context is not None else None,
                    outcome,
                    time.perf_counter() - started,
                    self.items if outcome == "committed" else None,
                )
            )

    async def _iterate(self) -> Decision:
        if self._held is None:
            lease = self.ctx.pool.acquire()
            self._held = (lease, await lease.__aenter__())
        conn = self._held[1]
        pid, server = self.ctx.driver.pid(conn), server_id(conn)
        self.ctx.in_flight[pid] = server
        try:
            decision = await self._transaction(conn)
        except anyio.get_cancelled_exc_class():
            raise  # the pid stays listed: its backend may live on, locks and all
        except BaseException:
            self.ctx.in_flight.pop(pid, None)
            with anyio.CancelScope(shield=True):
                broken = self.ctx.driver.broken(conn)
                if broken:
                    # asyncpg may report a connection the server dropped under it as an
                    # internal state error: it is a lost connection all the same.
                    self._lost = True
                await self._put_back()  # the pool checks it, and replaces it if broken
                if broken:
                    await self._end_backend(pid, server)
            raise
        self.ctx.in_flight.pop(pid, None)
        return decision

    async def _end_backend(self, pid: int, server: str | None) -> None:
        """The client side of an iteration's connection closed mid-statement (psycopg closes
        it when a cancellation, such as ``iteration_timeout``, interrupts its own cancel
        request): its backend may still be running the statement, holding the name's row
        lock, so that no retry or claim could proceed until it finished. End it."""
        if self.ctx.application_name is None or server is None:
            return
        ended = None
        try:
            # Bounded: the pool may be exhausted (its slot was just freed, but others may wait).
            with anyio.move_on_after(END_BACKEND_TIMEOUT):
                async with self.ctx.pool.acquire() as conn:
                    ended = await self.ctx.driver.session(conn, self.ctx.schema).fetchval(
                        "end_zombies", [], [pid], self.ctx.application_name, server
                    )
        except Exception as exc:
            log.warning("loop %r: could not end backend %d: %s", self.name, pid, exc)
            return
        if ended:
            log.warning("loop %r: ended backend %d, cut off mid-statement", self.name, pid)

    async def _put_back(self) -> None:
        """Return the connection held across back-to-back iterations to the pool."""
        held, self._held = self._held, None
        if held is None:
            return
        try:
            pid: int | None = (
                None if self.ctx.driver.broken(held[1]) else self.ctx.driver.pid(held[1])
            )
        except Exception:
            pid = None
        with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True) as scope:
            await held[0].__aexit__(None, None, None)
        if scope.cancelled_caught:
            abandon(held[1])  # the server does not answer: do not wait for it any longer
            return
        # A live connection came back reset (whatever a cancelled iteration left open is rolled
        # back): its backend is no zombie now, and may serve someone else's transaction next. A
        # broken one stays listed: its backend may live on.
        if pid is not None:
            self.ctx.in_flight.pop(pid, None)

    async def _transaction(self, conn: Any) -> Decision:
        # READ COMMITTED whatever the server default: the go-idle re-read needs a fresh snapshot.
        it = self.ctx.driver.iteration(
            conn,
            self.ctx.schema,
            self.name,
            self.generation,
            self.stop_key,
            prepare=self.ctx.prepare,
        )
        booked = await it.begin(self.bound.revision)
        try:
            if not booked:
                await self._fence(it.session)
                if not await it.book(self.bound.revision):
                    raise RuntimeError(f"loop {self.name!r}: its state changed while fencing")
            timeout = self.bound.config.iteration_timeout
            if timeout is None:
                decision, processed = await self._run_callables(conn, it.session)
            else:
                try:
                    with anyio.fail_after(timeout) as limit:
                        decision, processed = await self._run_callables(conn, it.session)
                except TimeoutError as exc:
                    if not limit.cancel_called:
                        raise  # the callables' own TimeoutError, not ours
                    # last_error says which limit, rather than a bare "TimeoutError".
                    raise TimeoutError(f"iteration_timeout ({timeout:g} s) exceeded") from exc
            if not it.open():
                raise TransactionAborted(
                    f"loop {self.name!r}: a callable ended the iteration's transaction (COMMIT "
                    "or ROLLBACK on the connection it was given); the loop commits it"
                )
            went = isinstance(decision, Sleep)  # go_idle / go_waiting already unbooked
            debounce = decision.delay if isinstance(decision, RunAgain) and processed else 0.0
            await it.commit(unbook=not processed and not went, debounce=debounce)
        except BaseException:
            with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True) as scope:
                if not self.ctx.driver.broken(conn):
                    await it.rollback()  # a no-op once the transaction is over
            if scope.cancelled_caught:
                abandon(conn)  # a frozen server: the pool replaces the connection
            raise
        if processed:
            self.failures = 0
            self.batches += 1
            self.worked_at = anyio.current_time()
        return decision

    async def _fence(self, s: Session) -> None:
        """Why booking failed: superseded (or a stop waiting), new callables, or a due wake-up."""
        fence = await s.fetchrow("fence", self.name, self.generation, self.stop_key)
        if fence is None:
            raise Superseded(self.name)
        if fence["revision"] != self.bound.revision:
            loaded = await s.fetchrow("load_worker", self.name)
            assert loaded is not None  # the fence row joined it
            self.bound = Bound.from_row(loaded)
        if fence["status"] == "waiting":
            await s.fetchval("wake_from_timeout", self.name)

    async def _run_callables(self, conn: Any, s: Session) -> tuple[Decision, bool]:
        """Query, then worker or go-idle. True when a batch was processed."""
        result = await self._query(conn)
        if isinstance(result, Work):
            return await self._process(conn, result), True
        since_work = 1e9 if self.once else anyio.current_time() - self.worked_at
        decision = decide.after_idle(result, since_work)
        if isinstance(decision, RunAgain):
            return decision, False
        if not await s.fetchval("try_go_idle", self.name):
            return RunAgain(result.poll_interval, "ping in flight"), False
        confirm = await self._query(conn)
        if isinstance(confirm, Work):
            log.debug("loop %r: work arrived while going idle", self.name)
            return await self._process(conn, confirm), True
        final = decide.after_confirm(False, confirm)
        assert isinstance(final, Sleep)
        if final.timeout is None:
            await s.fetchval("go_idle", self.name, self.generation)
        else:
            await s.fetchval("go_waiting", self.name, self.generation, float(final.timeout))
        log.debug("loop %r goes %s", self.name, final.state)
        return final, False

    async def _query(self, conn: Any) -> Work[Any] | Idle:
        with tracing.query_span():
            result: object = await self.bound.query.func(conn, self.name)
        if not isinstance(result, Work | Idle):
            raise TypeError(
                f"work query {self.bound.query.ref} returned {type(result).__name__}; "
                "return batchloop.Work(batch) or batchloop.Idle()"
            )
        if not self.warned_empty and isinstance(result, Work) and _empty(result.batch):
            # An empty batch is still work: the loop runs again at once, with no cooldown or
            # idle, and spins. Once per loop, so a spinning loop does not flood the log too.
            self.warned_empty = True
            log.warning(
                "loop %r: work query %s returned an empty batch (Work(%r)); the loop runs again "
                "at once and spins: return batchloop.Idle() when there is nothing to do",
                self.name,
                self.bound.query.ref,
                result.batch,
            )
        return result

    async def _process(self, conn: Any, work: Work[Any]) -> RunAgain:
        batch = work.batch
        adapter = self.bound.worker.batch_adapter
        if adapter is not None:
            try:
                batch = adapter.validate_python(batch)
            except Exception as exc:
                raise TypeError(
                    f"batch from {self.bound.query.ref} does not match the `batch` annotation "
                    f"of {self.bound.worker.ref}: {exc}"
                ) from exc
        self.items = len(batch) if isinstance(batch, Sized) else None
        with tracing.worker_span():
            ret = await self.bound.worker.func(conn, batch)
        if ret is not None and not isinstance(ret, Debounce):
            raise TypeError(
                f"worker {self.bound.worker.ref} returned {type(ret).__name__}; "
                "return None or batchloop.Debounce(seconds)"
            )
        return decide.after_work(ret)

    async def _failed(self, exc: Exception) -> Decision | None:
        self.failures += 1
        decision = decide.after_failure(
            self.failures, self.bound.config.monitor_lag, random.random()
        )
        lost, self._lost = connection_lost(exc) or self._lost, False
        log.log(
            logging.WARNING if lost else logging.ERROR,
            "loop %r failed (%d in a row%s), retrying in %.2fs%s",
            self.name,
            self.failures,
            ", connection lost" if lost else "",
            decision.delay,
            f": {exc}" if lost else "",
            exc_info=None if lost else exc,
        )
        message = storable("".join(traceback.format_exception_only(type(exc), exc)).strip())
        self.last_error = message
        try:
            async with self.ctx.pool.acquire() as conn:
                count = await self.ctx.driver.session(conn, self.ctx.schema).fetchval(
                    "record_failure", self.name, self.generation, message[:4000], decision.delay
                )
        except Exception as record_exc:
            log.warning("loop %r: could not record the failure: %s", self.name, record_exc)
            return decision
        if count is None:
            return None  # superseded meanwhile
        self.failures = int(count)
        return decision
