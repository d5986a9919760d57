"""One loop iteration: the whole transaction, issued from here (protocol sections "Generations
and fencing", "Revisions" and "No lost wakeup"; the loop around it is
:mod:`batchloop.runtime.loop`).

Each iteration is a single transaction on a pool connection, READ COMMITTED:

1. ``book_batch`` (sent with ``BEGIN``): the fence and the batch's bookkeeping in one write. It
   matches only while the generation is still ours (and our host its owner), the callables are
   the ones we loaded, the worker runs and no stop is waiting; its row lock then holds claims
   and stops off until we end. No match sends us to the full ``fence``, which tells superseded
   (leave without writing), new callables (reload) and a due wake-up apart.
2. Run the work query; on ``Work`` run the worker, then commit.
3. On ``Idle`` within the cooldown: put the bookkeeping back (``unbook_batch``, sent with
   ``COMMIT``) and poll again later. Past the cooldown: take the name's wake lock exclusively
   (``try_go_idle``: it fails while any ping transaction is in flight, and then we poll again),
   re-run the query with a fresh snapshot, and only if it still says idle, write idle or
   waiting (which also puts the bookkeeping back), sent with ``COMMIT``. A poll that the last
   one's ``Idle`` says will be past the cooldown has ``book_batch`` take the wake lock as well:
   its query is then the confirmation, and the first query and ``try_go_idle`` are saved
   (:func:`.decide.lock_first`).

The worker's writes and the bookkeeping commit together or not at all; a failure rolls the
iteration back and propagates to the loop, which records it.

Round trips: ``BEGIN`` travels with ``book_batch`` in one simple-protocol message, and the
closing statements travel with ``COMMIT``: no round trip of ours per batch beyond the two a
transaction needs anyway. ``book_batch`` is prepared once per server session (``PREPARE``, then
``EXECUTE`` in that message), so the server plans it once instead of on every batch; that is
most of what a batch costs batchloop on the server. Behind a transaction pooler, where a client
connection changes server sessions, it is sent inlined instead. Both texts are built once per
loop. The driver supplies only the I/O (:class:`batchloop.drivers.base.WorkConnection`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import weakref
from collections.abc import Sized
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import anyio

from .. import observe, sql
from ..connect import ResetWithCommit
from ..drivers.base import Row, Session, WorkConnection
from ..drivers.errors import sqlstate
from ..errors import Superseded, TransactionAborted
from ..models import Config, Debounce, Idle, Work
from ..observe import tracing
from ..registry import Registered, lookup
from ..status import parse_config
from . import decide, outcome
from .decide import Decision, RunAgain, Sleep

log = logging.getLogger("batchloop")

CLEANUP_TIMEOUT = 2.0
"""How long a cleanup step (a rollback) may wait on the server: a frozen one never answers.
Short, because giving up is safe: the connection is then closed, which rolls back too."""

DUPLICATE_PREPARED = "42P05"
UNKNOWN_PREPARED = "26000"

_PREPARED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
"""Server sessions (:meth:`~batchloop.drivers.base.WorkConnection.server_session`) holding our
prepared ``book_batch``, by schema."""


@cache
def _book_statement(schema: str) -> tuple[str, str]:
    """The prepared statement's name (unique to the query's text) and its ``PREPARE``."""
    text = sql.query("book_batch", schema)
    name = "batchloop_book_" + hashlib.sha1(text.encode()).hexdigest()[:16]
    return name, f"PREPARE {name} AS {text}"


@lru_cache(maxsize=4096)
def _begin_text(
    schema: str,
    name: str,
    generation: int,
    revision: int,
    stop_key: int,
    owner: str,
    lock: int,
    prepared: bool,
) -> str | None:
    """``BEGIN`` and ``book_batch``, executed or inlined; None if a value cannot be inlined."""
    args = (name, generation, revision, stop_key, owner, lock)
    if prepared:
        literals = [sql.literal(a) for a in args]
        if any(lit is None for lit in literals):
            return None
        book: str | None = f"EXECUTE {_book_statement(schema)[0]}({', '.join(literals)})"  # type: ignore[arg-type]
    else:
        book = sql.inline("book_batch", schema, *args)
    return None if book is None else f"BEGIN ISOLATION LEVEL READ COMMITTED; {book}"


@lru_cache(maxsize=4096)
def _commit_text(
    schema: str, name: str, generation: int, end: str, seconds: float, reset: str | None
) -> str | None:
    parts = closing(name, generation, end, seconds)
    inlined = [sql.inline(query, schema, *args) for query, args in parts]
    if any(text is None for text in inlined):
        return None
    return "; ".join([*inlined, *([reset] if reset else []), "COMMIT"])  # type: ignore[list-item]


def closing(
    name: str, generation: int, end: str, seconds: float = 0.0
) -> list[tuple[str, tuple[object, ...]]]:
    """The named query (with arguments) an iteration sends with its ``COMMIT``: ``end`` is
    ``unbook_batch`` (no batch), ``debounce`` (``seconds``), ``go_idle``, ``go_waiting``
    (``seconds``), or empty (a batch, run again at once)."""
    if end in ("unbook_batch", "go_idle"):
        return [(end, (name, generation))]
    if end in ("debounce", "go_waiting"):
        return [(end, (name, generation, float(seconds)))]
    return []


def check_committed(tag: str, name: str) -> None:
    """PostgreSQL answers COMMIT of a failed transaction with ROLLBACK, not an error."""
    if tag != "COMMIT":
        raise TransactionAborted(
            f"loop {name!r}: the iteration's transaction was rolled back at COMMIT ({tag}): a "
            "statement in it failed and its error was caught inside a callable; let it "
            "propagate, or catch it inside `async with conn.transaction():` (a savepoint)"
        )


def _ending(decision: Decision, processed: bool) -> tuple[str, float]:
    """Which closing statement goes with the COMMIT (:func:`closing`)."""
    if isinstance(decision, Sleep):  # confirmed idle under the wake lock
        if decision.timeout is None:
            return "go_idle", 0.0
        return "go_waiting", float(decision.timeout)
    if not processed:
        return "unbook_batch", 0.0
    if isinstance(decision, RunAgain) and decision.delay > 0:
        return "debounce", decision.delay
    return "", 0.0


class CallableMissing(Exception):
    """A row names a callable this process did not register."""


@dataclass(slots=True)
class LoadedWorker:
    """The callables and config a loop runs with, loaded at one ``workers.revision``."""

    revision: int
    query: Registered
    worker: Registered
    config: Config

    @classmethod
    def from_row(cls, row: Row) -> LoadedWorker:
        query = lookup(row["work_query"], "work_query")
        worker = lookup(row["worker"], "worker")
        if query is None or worker is None:
            missing = row["work_query"] if query is None else row["worker"]
            raise CallableMissing(f"{missing} is not registered in this process")
        config = row["config"]
        parsed = _config(config) if isinstance(config, str) else parse_config(config)
        return cls(row["revision"], query, worker, parsed)


@lru_cache(maxsize=1024)
def _config(text: str) -> Config:
    """A stored config, parsed once per text: claims are on the wake-up's critical path, and a
    Config is immutable, so loops may share one."""
    return parse_config(text)


def _empty(batch: object) -> bool:
    """A batch with nothing in it: a sized value of length 0 (anything unsized is not)."""
    return isinstance(batch, Sized) and len(batch) == 0


class Transaction:
    """The statements that open and close one iteration's transaction, in as few messages as
    the driver allows: ``BEGIN`` with ``book_batch``, the closing statements with ``COMMIT``."""

    def __init__(
        self,
        io: WorkConnection,
        schema: str,
        name: str,
        generation: int,
        stop_key: int,
        owner: str,
        *,
        prepare: bool,
        reset: ResetWithCommit | None = None,
    ) -> None:
        self.io = io
        self._schema = schema
        self._name, self._generation, self._stop_key = name, generation, stop_key
        self._owner = owner
        self._prepare = prepare
        self._reset = reset
        self._simple = False
        """Whether BEGIN went as our own text (so COMMIT may go the same way)."""

    async def begin(self, revision: int, *, lock_first: bool = False) -> bool:
        """Open the transaction and book a batch (with ``lock_first``, taking the wake lock
        too); False if that did not match (the fence, or with ``lock_first`` a ping in flight)."""
        io = self.io
        if self._reset is not None:
            self._reset.undone(io.server_session())  # in use again: its release resets it
        key = (
            self._schema,
            self._name,
            self._generation,
            revision,
            self._stop_key,
            self._owner,
            int(lock_first),
        )
        text, prepared = None, False
        if io.sends_text:
            prepared = self._prepare and await self._prepared()
            text = _begin_text(*key, prepared)
        if text is None:
            await io.begin()
            try:
                return await self.book(revision, lock_first=lock_first)
            except BaseException:
                await io.rollback()
                raise
        try:
            try:
                tag = await io.send(text)
            except Exception as exc:
                if not prepared or sqlstate(exc) != UNKNOWN_PREPARED:
                    raise
                # Deallocated under us (DEALLOCATE ALL, DISCARD ALL): inline it this time.
                _PREPARED.pop(io.server_session(), None)
                await io.rollback()
                tag = await io.send(_begin_text(*key, False) or "")
        except BaseException:
            with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True):
                # The connection went (asyncpg may even have released it to the pool, which
                # makes any call on it fail): the original error says why.
                with contextlib.suppress(Exception):
                    await io.rollback()
            raise
        self._simple = True
        io.began_as_text()
        return tag == "UPDATE 1"

    async def _prepared(self) -> bool:
        """Whether ``book_batch`` is prepared in this session, preparing it if not."""
        session = self.io.server_session()
        if self._schema in _PREPARED.get(session, ()):
            return True
        try:
            await self.io.send(_book_statement(self._schema)[1])
        except Exception as exc:
            state = sqlstate(exc)
            if state is None:
                raise  # the connection, not the statement
            if state != DUPLICATE_PREPARED:
                return False  # e.g. the schema is missing: the inlined text will say so
        _PREPARED.setdefault(session, set()).add(self._schema)
        return True

    async def book(self, revision: int, *, lock_first: bool = False) -> bool:
        """``book_batch`` with parameters (after the full fence sorted things out, or where
        the values cannot be inlined)."""
        args = (self._name, self._generation, revision, self._stop_key, self._owner)
        return await self.io.execute("book_batch", *args, int(lock_first)) == "UPDATE 1"

    async def commit(self, end: str = "", seconds: float = 0.0, *, leaving: bool = False) -> None:
        """Commit, with the closing statement :func:`closing` names (one message); ``leaving``:
        the connection goes back to the pool next, so its reset goes with the COMMIT too."""
        text, reset = None, self._reset if leaving else None
        if self._simple:
            reset_text = None if reset is None else reset.text(self.io.raw)
            text = _commit_text(
                self._schema, self._name, self._generation, end, seconds, reset_text
            )
        else:
            reset = None
        if text is not None:
            tag = await self.io.send(text)
        else:
            for query, args in closing(self._name, self._generation, end, seconds):
                await self.io.execute(query, *args)
            tag = await self.io.commit()
        self.io.ended_as_text()
        check_committed(tag, self._name)
        if reset is not None:
            reset.done(self.io.server_session())

    async def rollback(self) -> None:
        """A no-op once the transaction is over."""
        await self.io.rollback()


@dataclass(slots=True)
class Iteration:
    """One name's iteration, at its generation: :meth:`run` is one transaction."""

    schema: str
    name: str
    generation: int
    stop_key: int
    owner: str
    """The host that claimed this generation (``worker_state.owner_host``), which the fence
    tests along with the generation."""
    loaded: LoadedWorker
    """The callables and config in force; the fence replaces them on a new revision."""
    prepare: bool = False
    """Keep ``book_batch`` prepared on each connection (not behind a transaction pooler)."""
    reset: ResetWithCommit | None = None
    """The pool's reset, to send with the COMMIT before the connection goes back (None: the
    pool's release runs it)."""
    warned_empty: bool = False
    """Whether this loop has logged that its work query returned an empty batch."""
    items: int | None = None
    """``len()`` of the last batch processed (None: unsized), for the observers."""
    last_idle: Idle | None = None
    """What the last query that found no work returned: whether the next poll will be past
    the cooldown, before its own query says so."""

    async def run(
        self, io: WorkConnection, worked_at: float | None, *, quiet: bool = False
    ) -> tuple[Decision, bool]:
        """One transaction on ``io``; what next, and whether a batch was processed.

        ``worked_at``: ``anyio.current_time()`` of the last batch or wake, for the cooldown
        (None: no cooldown polling, as in a tick's drain). ``quiet``: a poll after a poll, with
        no sign of new work (no 'c' wake-up came in): it may take the wake lock first.
        Raises on failure, rolled back."""
        # READ COMMITTED whatever the server default: the go-idle re-read needs a fresh snapshot.
        tx = Transaction(
            io,
            self.schema,
            self.name,
            self.generation,
            self.stop_key,
            self.owner,
            prepare=self.prepare,
            reset=self.reset,
        )
        # One clock reading for the whole iteration, so that a poll that took the lock first
        # is also the one that goes idle (the cooldown only decides when polling stops).
        since_work = None if worked_at is None else anyio.current_time() - worked_at
        lock_first = (
            quiet and since_work is not None and decide.lock_first(self.last_idle, since_work)
        )
        booked = await tx.begin(self.loaded.revision, lock_first=lock_first)
        # No match: the fence (or a ping in flight) is sorted out below, and then the usual
        # go-idle takes the lock itself.
        locked = lock_first and booked
        with outcome.collect() as pending:
            try:
                decision, processed = await self._transaction(io, tx, booked, since_work, locked)
            except BaseException:
                outcome.settle(pending, committed=False)
                raise
            outcome.settle(pending, committed=True)
        return decision, processed

    async def _transaction(
        self,
        io: WorkConnection,
        tx: Transaction,
        booked: bool,
        since_work: float | None,
        locked: bool,
    ) -> tuple[Decision, bool]:
        try:
            if not booked:
                await self._fence(io.session)
                if not await tx.book(self.loaded.revision):
                    raise RuntimeError(f"loop {self.name!r}: its state changed while fencing")
            timeout = self.loaded.config.iteration_timeout
            if timeout is None:
                decision, processed = await self._callables(io, since_work, locked)
            else:
                try:
                    with anyio.fail_after(timeout) as limit:
                        decision, processed = await self._callables(io, since_work, locked)
                except TimeoutError as exc:
                    if not limit.cancel_called:
                        raise  # the callables' own TimeoutError, not ours
                    # last_error says which limit, rather than a bare "TimeoutError".
                    raise TimeoutError(f"iteration_timeout ({timeout:g} s) exceeded") from exc
            if not io.in_transaction():
                raise TransactionAborted(
                    f"loop {self.name!r}: a callable ended the iteration's transaction (COMMIT "
                    "or ROLLBACK on the connection it was given); the loop commits it"
                )
            # A sleep follows (the loop gives the connection back): reset it with the COMMIT.
            leaving = isinstance(decision, Sleep) or decision.delay > 0
            await tx.commit(*_ending(decision, processed), leaving=leaving)
        except BaseException:
            with anyio.move_on_after(CLEANUP_TIMEOUT, shield=True) as scope:
                if not io.broken():
                    await tx.rollback()
            if scope.cancelled_caught:
                io.abandon()  # a frozen server: the pool replaces the connection
            raise
        return decision, processed

    async def _fence(self, s: Session) -> None:
        """Why booking failed: superseded (or a stop waiting), new callables, or a due wake-up."""
        fence = await s.fetchrow("fence", self.name, self.generation, self.stop_key, self.owner)
        if fence is None:
            raise Superseded(self.name)
        if fence["revision"] != self.loaded.revision:
            loaded = await s.fetchrow("load_worker", self.name)
            assert loaded is not None  # the fence row joined it
            self.loaded = LoadedWorker.from_row(loaded)
        if fence["status"] == "waiting":
            await s.fetchval("wake_from_timeout", self.name)

    async def _callables(
        self, io: WorkConnection, since_work: float | None, locked: bool
    ) -> tuple[Decision, bool]:
        """Query, then worker or go-idle. True when a batch was processed. ``since_work``:
        seconds since the last batch or wake at the iteration's start (None: no cooldown).
        ``locked``: the wake lock is held already, so this query's answer is the go-idle
        confirmation."""
        conn = io.raw
        result = await self._query(conn)
        if isinstance(result, Work):
            # Under the wake lock (rare: new work without a 'c'), pings wait for this batch.
            return await self._process(conn, result), True
        self.last_idle = result
        decision = decide.after_idle(result, 1e9 if since_work is None else since_work)
        if isinstance(decision, RunAgain):
            return decision, False
        if not locked:
            if not await io.session.fetchval("try_go_idle", self.name):
                return RunAgain(result.poll_interval, "ping in flight"), False
            result = await self._query(conn)
            if isinstance(result, Work):
                log.debug("loop %r: work arrived while going idle", self.name)
                return await self._process(conn, result), True
        final = decide.after_confirm(result)  # go_idle / go_waiting travel with the COMMIT
        log.debug("loop %r goes %s", self.name, final.state)
        return final, False

    async def _query(self, conn: Any) -> Work[Any] | Idle:
        with tracing.query_span():
            result: object = await self.loaded.query.func(conn, self.name)
        if not isinstance(result, Work | Idle):
            raise TypeError(
                f"work query {self.loaded.query.ref} returned {type(result).__name__}; "
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
                self.loaded.query.ref,
                result.batch,
            )
        return result

    async def _process(self, conn: Any, work: Work[Any]) -> RunAgain:
        batch = work.batch
        adapter = self.loaded.worker.batch_adapter
        if adapter is not None:
            try:
                batch = adapter.validate_python(batch)
            except Exception as exc:
                raise TypeError(
                    f"batch from {self.loaded.query.ref} does not match the `batch` annotation "
                    f"of {self.loaded.worker.ref}: {exc}"
                ) from exc
        if observe.observers:
            self.items = len(batch) if isinstance(batch, Sized) else None
        with tracing.worker_span():
            ret = await self.loaded.worker.func(conn, batch)
        if ret is not None and not isinstance(ret, Debounce):
            raise TypeError(
                f"worker {self.loaded.worker.ref} returned {type(ret).__name__}; "
                "return None or batchloop.Debounce(seconds)"
            )
        return decide.after_work(ret)
