"""One name's loop on its owning host: its schedule (protocol sections "States" and "Recovery
bounds").

Sleep until due (or poked), run one iteration (:mod:`batchloop.runtime.iteration`, which owns
the whole transaction), act on its decision, repeat; keep the pool connection between
iterations that follow each other without a pause; on a failure record it in a transaction of
its own and retry with backoff, ending the backend of a connection lost mid-statement; release
the name at the end. The decisions themselves are pure functions in
:mod:`batchloop.runtime.decide`.
"""

from __future__ import annotations

import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import InitVar, dataclass, field
from typing import Any, Protocol

import anyio

from .. import observe
from ..connect import ResetWithCommit, server_id
from ..drivers.base import LoopDriver, Row
from ..drivers.errors import connection_lost, timed_out
from ..errors import Superseded
from ..models import Config
from ..observe import logs as observe_logs
from ..observe import tracing
from . import decide
from .decide import Decision, Sleep
from .iteration import CLEANUP_TIMEOUT, CallableMissing, Iteration, LoadedWorker

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


class ConnectionSource(Protocol):
    """An asyncpg Pool, or anything else that lends connections the same way."""

    def acquire(self) -> AbstractAsyncContextManager[Any]: ...


@dataclass(slots=True)
class LoopContext:
    """What a loop needs from its host."""

    pool: ConnectionSource
    schema: str
    release: Callable[[NameLoop], Awaitable[None]]
    driver: LoopDriver
    """The client library of ``pool``'s connections, which the user's callables get."""
    owner: str
    """The id the claims write as ``worker_state.owner_host`` (a host's, or a tick's): the
    fence matches it with the generation."""
    prepare: bool = False
    """Keep ``book_batch`` prepared on each connection (not behind a transaction pooler)."""
    application_name: str | None = None
    """The host's, on every connection it opens: lets a loop end the server side of a
    connection it lost mid-statement, and only that (None: never try)."""
    reset: ResetWithCommit | None = None
    """The pool's reset-on-release, sent with a loop's last COMMIT before it sleeps."""
    polls: anyio.Semaphore | None = None
    """Bounds the cooldown polls running at once (None: no bound), so that when thousands of
    loops cool down together, their polls (speculative: nothing was found last time, and a
    ping on a cooling loop wakes it anyway) leave pool connections free for loops with work:
    under such load a poll runs late rather than a first batch."""
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
    loaded: InitVar[LoadedWorker]
    """The callables and config at the claim (then :attr:`iteration` keeps them current)."""
    failures: int
    first_delay: float
    poke: anyio.Event = field(default_factory=anyio.Event)
    stopping: bool = False
    unrunnable: bool = False
    once: bool = False
    """A tick's drain pass: no cooldown polling, stop at the first failure or sleep."""
    deadline: float | None = None
    """A tick's budget end (``anyio.current_time()``): no iteration starts after it."""
    outcome: str = "cancelled"
    """Why run() returned: idle, waiting, superseded, failed, stopped, unrunnable, budget,
    cancelled."""
    batches: int = 0
    last_error: str | None = None
    polling: bool = False
    """The last iteration found no work within the cooldown: the loop sleeps only until its
    next poll, and a ping may cut that short (:meth:`work_arrived`)."""
    sleeping: bool = False
    """Inside :meth:`_sleep` (only then does a poke cut anything short)."""
    arrivals: int = 0
    """'c' wake-ups received: a ping committed work while this loop was cooling."""
    seen: int = 0
    """``arrivals`` when the last iteration began: any beyond it came in after its query may
    have taken its snapshot, so the loop must look again before it sleeps."""
    worked_at: float = 0.0
    """``anyio.current_time()`` of the last batch or wake, for the cooldown: set from the
    database's ``since_work`` at the claim and at every re-arm, then by our own batches."""
    _lost: bool = False
    """The last iteration's connection broke: its failure is a connection loss, whatever
    exception the driver raised for it."""
    _held: tuple[AbstractAsyncContextManager[Any], Any] | None = None
    """A pool connection kept between iterations that follow each other without a pause,
    which spares a pool round trip (asyncpg resets connections on release) per batch."""
    iteration: Iteration = field(init=False)

    def __post_init__(self, loaded: LoadedWorker) -> None:
        self.iteration = Iteration(
            self.ctx.schema,
            self.name,
            self.generation,
            self.stop_key,
            self.ctx.owner,
            loaded,
            prepare=self.ctx.prepare,
            reset=self.ctx.reset,
        )

    @property
    def config(self) -> Config:
        """The config in force (the latest revision the iteration loaded)."""
        return self.iteration.loaded.config

    @classmethod
    def claimed(
        cls, ctx: LoopContext, name: str, row: Row, loaded: LoadedWorker, **options: Any
    ) -> NameLoop:
        """The loop for a name just claimed; ``row`` is what ``claim()`` returned."""
        return cls(
            ctx=ctx,
            name=name,
            generation=row["generation"],
            lock_key=row["lock_key"],
            stop_key=row["stop_key"],
            loaded=loaded,
            failures=row["consecutive_failures"],
            first_delay=row["run_in"],
            worked_at=anyio.current_time() - row["since_work"],
            **options,
        )

    def wake(self) -> None:
        """Cut the current sleep short (a ping woke us, or the host is shutting down)."""
        self.poke.set()

    @property
    def missed_work(self) -> bool:
        """Polling, and a ping's 'c' came in after the last iteration began: its query may not
        have seen that work, so the loop must look again rather than sleep."""
        return self.polling and self.arrivals != self.seen

    @property
    def quiet_poll(self) -> bool:
        """Polling, and no 'c' came in since the last iteration began: the next iteration is
        a speculative poll (bounded by ``LoopContext.polls``, and it may take the wake lock
        first)."""
        return self.polling and self.arrivals == self.seen

    def work_arrived(self) -> None:
        """A ping committed work while this loop was cooling down: poll now, not at the next
        poll. Only a poll is cut short; a debounce, a failure backoff or a waiting deadline
        stands. If an iteration is running, its query may have missed the work (its snapshot
        came first): the next poll then follows at once."""
        self.arrivals += 1
        if self.polling and self.sleeping:
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
                    if self.missed_work:
                        # The iteration's fence is the authority; no need to re-read the state.
                        delay = 0.0
                        continue
                    fresh = await self._rearm()
                    if fresh is None:
                        self.outcome = "stopped"
                        break
                    delay = fresh
                    continue
                decision = await self._iterate_or_fail()
                if decision is None:
                    break
                if isinstance(decision, Sleep):
                    self.outcome = decision.state
                    if decision.timeout is None or self.once:
                        break
                    delay = decision.timeout
                elif self.missed_work:
                    delay = 0.0  # work arrived during this iteration, perhaps after its query
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
        self.sleeping = True
        try:
            with anyio.move_on_after(delay):
                await self.poke.wait()
                self.poke = anyio.Event()
                return True
            return False
        finally:
            self.sleeping = False

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
                    self.iteration.items if outcome == "committed" else None,
                )
            )

    async def _iterate(self) -> Decision:
        polls = self.ctx.polls
        quiet = self.quiet_poll
        if polls is not None and quiet:
            async with polls:
                return await self._iterate_now(quiet)
        return await self._iterate_now(quiet)

    async def _iterate_now(self, quiet: bool) -> Decision:
        self.seen = self.arrivals
        if self._held is None:
            lease = self.ctx.pool.acquire()
            self._held = (lease, await lease.__aenter__())
        conn = self._held[1]
        pid, server = self.ctx.driver.pid(conn), server_id(conn)
        self.ctx.in_flight[pid] = server
        try:
            io = self.ctx.driver.work(conn, self.ctx.schema)
            decision, processed = await self.iteration.run(
                io, None if self.once else self.worked_at, quiet=quiet
            )
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
        # Polling: no batch and not going to sleep; only then may a ping's 'c' cut a sleep short.
        self.polling = not processed and not isinstance(decision, Sleep)
        if processed:
            self.failures = 0
            self.batches += 1
            self.worked_at = anyio.current_time()
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
            # The server does not answer: do not wait for it any longer.
            self.ctx.driver.abandon(held[1])
            return
        # A live connection came back reset (whatever a cancelled iteration left open is rolled
        # back): its backend is no zombie now, and may serve someone else's transaction next. A
        # broken one stays listed: its backend may live on.
        if pid is not None:
            self.ctx.in_flight.pop(pid, None)

    async def _failed(self, exc: Exception) -> Decision | None:
        self.failures += 1
        decision = decide.after_failure(self.failures, self.config.monitor_lag, random.random())
        lost, self._lost = connection_lost(exc) or self._lost, False
        # A timeout (iteration_timeout above all) may close the connection too, but the
        # timeout is what happened: say so rather than "connection lost".
        why = ", timed out" if timed_out(exc) else ", connection lost" if lost else ""
        log.log(
            logging.WARNING if lost else logging.ERROR,
            "loop %r failed (%d in a row%s), retrying in %.2fs%s",
            self.name,
            self.failures,
            why,
            decision.delay,
            f": {exc}" if lost else "",
            exc_info=None if lost else exc,
        )
        message = storable("".join(traceback.format_exception_only(type(exc), exc)).strip())
        self.last_error = message
        try:
            async with self.ctx.pool.acquire() as conn:
                row = await self.ctx.driver.session(conn, self.ctx.schema).fetchrow(
                    "record_failure", self.name, self.generation, message[:4000], decision.delay
                )
        except Exception as record_exc:
            log.warning("loop %r: could not record the failure: %s", self.name, record_exc)
            return decision
        if row is None:
            return None  # superseded meanwhile
        self.failures = int(row["consecutive_failures"])
        if row["stopped"]:
            # The database stopped it (Config.max_failures), bumping the generation: a poison
            # batch ends here, visibly, until someone fixes it and calls start.
            log.error(
                "loop %r stopped after %d consecutive failures (max_failures); last error: %s;"
                " `batchloop start %s` resumes it",
                self.name,
                self.failures,
                message,
                self.name,
            )
            self.outcome = "stopped"
            return None
        return decision
