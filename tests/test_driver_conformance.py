"""The driver conformance suite (in the manner of River's ``riverdrivertest``): the iteration's
transaction and its misuse by user code, run over every loop driver from this one module.

Each test runs once per driver: a host whose loops hand asyncpg connections to the callables
(``jobs``), and one whose loops hand psycopg ``AsyncConnection`` s (``psycopg_jobs``, the same
work written for psycopg). What a driver must get right is the I/O of
:class:`batchloop.drivers.base.WorkConnection`; the statements are the runtime's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import input_jobs
import psycopg
import pytest

import batchloop as bl
from batchloop.drivers.asyncpg import AsyncpgLoopDriver
from batchloop.drivers.psycopg import PsycopgLoopDriver

import jobs
import psycopg_jobs
from helpers import count, wait_for

pytestmark = pytest.mark.anyio

DRIVERS = ["asyncpg", "psycopg"]


@dataclass
class Driver:
    """One driver under test: its callables' module, a connection of its own kind (for pings
    and status) and an asyncpg admin connection (for counting rows)."""

    name: str
    jobs: Any
    conn: Any
    admin: asyncpg.Connection
    dsn: str

    def knobs(self, name: str) -> Any:
        return self.jobs.knobs(name)

    def host(self, modules: tuple[str, ...] = ("jobs", "psycopg_jobs"), **options: Any) -> bl.Host:
        return bl.Host(self.dsn, modules=list(modules), driver=self.name, **options)  # type: ignore[arg-type]

    async def ping(self, name: str, n: int, config: bl.Config | None = None) -> str:
        result: str = await self.jobs.insert_and_ping(self.conn, name, n, config=config)
        return result

    async def savepoint_ping(self, name: str, n: int) -> None:
        """Ping ``name`` with a worker that rolls back a nested transaction (a savepoint)."""
        if self.name == "psycopg":
            await self.ping(name, n)  # psycopg_jobs.process_items nests one in every batch
            return
        async with self.conn.transaction():
            await self.conn.execute(
                "INSERT INTO items (name) SELECT $1 FROM generate_series(1, $2)", name, n
            )
            await bl.ping(self.conn, name, jobs.next_items, jobs.savepoint_worker)

    async def count(self, query: str) -> int:
        return await count(self.admin, query)

    async def idle(self, name: str, timeout: float = 20.0) -> bl.WorkerStatus:
        st: bl.WorkerStatus = await wait_for(
            lambda: bl.status(self.conn, name),
            expect=lambda s: s is not None and s.state == "idle",
            timeout=timeout,
        )
        return st

    async def drained(self) -> tuple[int, int, int]:
        """Rows in ``done``, distinct items in it, and ``items`` left."""
        return (
            await self.count("SELECT count(*) FROM done"),
            await self.count("SELECT count(DISTINCT item_id) FROM done"),
            await self.count("SELECT count(*) FROM items"),
        )


@pytest.fixture(params=DRIVERS)
async def drv(request: pytest.FixtureRequest, migrated_dsn: str) -> AsyncIterator[Driver]:
    admin = await asyncpg.connect(migrated_dsn)
    await jobs.create_tables(admin)
    if request.param == "psycopg":
        conn: Any = await psycopg.AsyncConnection.connect(migrated_dsn, autocommit=True)
        module: Any = psycopg_jobs
    else:
        conn, module = admin, jobs
    try:
        yield Driver(request.param, module, conn, admin, migrated_dsn)
    finally:
        if conn is not admin:
            await conn.close()
        await admin.close()


async def _drive(
    drv: Driver, name: str, config: bl.Config | None = None, **host_options: Any
) -> bl.WorkerStatus:
    """Drain 30 items of ``name``; the final status."""
    async with drv.host(**host_options):
        await drv.ping(name, 30, config=config)
        return await drv.idle(name)


# --------------------------------------------------------------------------------------------
# Misuse of the transaction by user code


async def test_a_caught_sql_error_fails_the_batch_instead_of_losing_it(drv: Driver) -> None:
    """PostgreSQL answers COMMIT of an aborted transaction with ROLLBACK and no error: the
    loop must notice, record a failure and redo the batch, not count it as done."""
    name = f"swallow-{drv.name}"
    k = drv.knobs(name)
    k.limit, k.swallow_errors = 10, 2
    st = await _drive(drv, name)
    assert "rolled back at COMMIT" in (st.last_error or "")
    assert await drv.drained() == (30, 30, 0)
    assert st.batches == 3 and st.consecutive_failures == 0


async def test_a_callable_that_commits_is_reported(drv: Driver) -> None:
    name = f"commit-{drv.name}"
    k = drv.knobs(name)
    k.limit, k.commit_itself = 10, 1
    st = await _drive(drv, name)
    assert "ended the iteration's transaction" in (st.last_error or "")
    # its writes and the batch's bookkeeping committed together, by the callable's COMMIT
    assert await drv.drained() == (30, 30, 0)


async def test_a_callable_that_rolls_back_is_reported(drv: Driver) -> None:
    """A ROLLBACK from user code undoes the batch's writes; the loop reports it as a failure
    (it cannot commit a transaction that is gone) and the batch is redone, once."""
    name = f"rollback-{drv.name}"
    k = drv.knobs(name)
    k.limit, k.rollback_itself = 10, 1
    st = await _drive(drv, name)
    assert "ended the iteration's transaction" in (st.last_error or "")
    assert await drv.drained() == (30, 30, 0)
    assert st.batches == 3 and st.consecutive_failures == 0


@pytest.mark.parametrize("name", ["nested", "odd $bl$ name$", "quote's \\ back"])
async def test_worker_may_nest_transactions_and_any_name_works(drv: Driver, name: str) -> None:
    """The loop's transaction is the driver's own, so conn.transaction() in a worker is a
    savepoint; names that cannot be inlined into the fast path take the parameterised path."""
    async with drv.host():
        await drv.savepoint_ping(name, 3)
        await wait_for(lambda: drv.count("SELECT count(*) FROM items"), expect=0)
        assert await drv.count("SELECT count(*) FROM calls WHERE name = 'inside-savepoint'") == 0
        st = await wait_for(lambda: bl.status(drv.conn, name))
        assert st.batches == 1 and st.consecutive_failures == 0


async def test_a_name_that_defeats_inlining_still_runs(drv: Driver) -> None:
    """Names are arbitrary text: one that cannot be dollar-quoted safely goes through the
    parameterised statements instead."""
    names = ["x$bl", "$bl$", "it's", "100%", "a$"]
    async with drv.host():
        for n in names:
            await drv.ping(n, 5)
        await wait_for(lambda: drv.count("SELECT count(*) FROM items"), expect=0)
        for n in names:
            st = await wait_for(
                lambda n=n: bl.status(drv.conn, n), expect=lambda s: s.state == "idle"
            )
            assert st.batches == 1 and st.last_error is None, (n, st.last_error)


# --------------------------------------------------------------------------------------------
# iteration_timeout


async def test_iteration_timeout_cancels_and_counts_as_failure(drv: Driver) -> None:
    name = f"slow-gate-{drv.name}"
    drv.knobs(name).gate = asyncio.Event()  # never set: the batch would hang
    async with drv.host():
        await drv.ping(name, 1, config=bl.Config(iteration_timeout=0.3))
        st = await wait_for(
            lambda: bl.status(drv.conn, name),
            expect=lambda s: s is not None and s.consecutive_failures >= 2,
        )
        assert "TimeoutError" in (st.last_error or "")
        assert await drv.count("SELECT count(*) FROM done") == 0  # rolled back
        drv.knobs(name).gate = None
        await wait_for(lambda: drv.count("SELECT count(*) FROM done"), expect=1)


async def test_iteration_timeout_cuts_off_a_running_statement(
    drv: Driver, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch stuck in a 30 s statement is rolled back after iteration_timeout and retried at
    once (well within the 20 s the test waits), and the server stops running the statement
    (psycopg closes a connection whose cancel request was itself interrupted; its backend would
    otherwise hold the name's row lock for the full 30 s). The log says it timed out, not that
    the connection was lost."""
    name = f"slow-{drv.name}"
    k = drv.knobs(name)
    k.limit, k.server_sleep = 10, 30.0
    config = bl.Config(iteration_timeout=0.5)
    # One pool connection: ending the lost backend must not wait for a pool slot of its own.
    with caplog.at_level(logging.WARNING, logger="batchloop"):
        st = await _drive(drv, name, config, pool_max_size=1)
    assert "TimeoutError" in (st.last_error or ""), st.last_error
    assert await drv.drained() == (30, 30, 0)
    sleeping = "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%'"
    assert await drv.count(sleeping) == 0
    failed = [r.getMessage() for r in caplog.records if f"loop {name!r} failed" in r.getMessage()]
    assert failed and all(", timed out" in m for m in failed), failed
    assert not any("connection lost" in m for m in failed), failed


# --------------------------------------------------------------------------------------------
# The prepared book_batch, and a lost connection


async def test_book_batch_is_prepared_once_per_session_and_survives_deallocate(
    drv: Driver,
) -> None:
    """Each batch begins by EXECUTE of a per-session prepared book_batch; if user code
    deallocates it, the next batch books inline and prepares it again, without a failure."""
    name = f"prepared-{drv.name}"
    k = drv.knobs(name)
    k.limit, k.drop_prepared = 10, 2
    async with drv.host(pool_max_size=1):
        await drv.ping(name, 60)
        st = await drv.idle(name)
    assert st.batches == 6
    assert st.consecutive_failures == 0 and st.last_error is None, st.last_error
    # one connection: prepared, dropped; that batch books inline (0) and the next prepares
    # again; dropped again; then prepared for good
    assert k.prepared_seen == [1, 0, 1, 0, 1, 1], k.prepared_seen
    assert await drv.count("SELECT count(DISTINCT item_id) FROM done") == 60


async def test_work_connection_killed_mid_batch(drv: Driver) -> None:
    """The batch on a terminated connection rolls back and is redone on a fresh one."""
    name = f"kill-{drv.name}"
    k = drv.knobs(name)
    k.limit = 10
    k.gate = gate = asyncio.Event()
    async with drv.host():
        await drv.ping(name, 30)
        await wait_for(k.entered.is_set)
        victim = k.pids[-1]
        assert await drv.admin.fetchval("SELECT pg_terminate_backend($1)", victim)
        k.gate = None
        gate.set()
        await wait_for(lambda: drv.count("SELECT count(*) FROM items"), expect=0)
        st = await drv.idle(name)
        assert st.last_error is not None and st.consecutive_failures == 0
        assert await drv.count("SELECT count(*) FROM done") == 30
        assert await drv.count("SELECT count(DISTINCT item_id) FROM done") == 30
        assert victim not in k.pids[k.pids.index(victim) + 1 :]


# --------------------------------------------------------------------------------------------
# Failures whose text PostgreSQL cannot store as it is


@pytest.mark.parametrize("text", ["\x00 at the start", "bad\x00byte and \udc80 here"])
async def test_a_failure_with_nul_or_surrogate_text_is_recorded(drv: Driver, text: str) -> None:
    name = f"nul-{drv.name}-{len(text)}"
    input_jobs.MODES[name] = "fail"
    input_jobs.ERRORS[name] = text
    escaped = text.replace("\x00", "\\x00").replace("\udc80", "\\udc80")
    async with drv.host(modules=("input_jobs",)):
        await bl.ping(drv.conn, name, input_jobs.query, input_jobs.worker)
        st = await wait_for(
            lambda: bl.status(drv.conn, name),
            expect=lambda s: s is not None and s.consecutive_failures >= 2,
        )
        assert st.last_error == f"RuntimeError: {escaped}"
        await bl.stop(drv.conn, name)


# --------------------------------------------------------------------------------------------
# Round trips: what the runtime sends through the driver, per iteration


class _Recorder:
    """A WorkConnection that logs what the iteration asks of it (the callables' own
    statements go straight to the raw connection and are not logged)."""

    def __init__(self, io: Any, calls: list[str]) -> None:
        self._io, self._calls = io, calls

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._io, attr)

    @property
    def session(self) -> Any:
        outer = self

        class _Session:
            def __getattr__(self, attr: str) -> Any:
                method = getattr(outer._io.session, attr)

                async def call(query: str, *args: Any) -> Any:
                    outer._calls.append(f"query:{query}")
                    return await method(query, *args)

                return call

        return _Session()

    async def send(self, text: str) -> str:
        self._calls.append(f"send:{text}")
        result: str = await self._io.send(text)
        return result

    async def execute(self, query: str, *args: Any) -> str:
        self._calls.append(f"execute:{query}")
        result: str = await self._io.execute(query, *args)
        return result

    async def begin(self) -> None:
        self._calls.append("begin")
        await self._io.begin()

    async def commit(self) -> str:
        self._calls.append("commit")
        result: str = await self._io.commit()
        return result


async def test_each_iteration_is_two_messages_of_ours(
    drv: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hot path: BEGIN travels with book_batch (EXECUTE of the statement prepared once per
    server session), the closing statements with COMMIT; a batch costs batchloop two messages
    and nothing else (bench/drain.py measures what that buys)."""
    cls: Any = AsyncpgLoopDriver if drv.name == "asyncpg" else PsycopgLoopDriver
    original = vars(cls)["work"]  # a method or a staticmethod: bind it as the class would
    iterations: list[list[str]] = []

    def work(self: Any, conn: Any, schema: str) -> Any:
        iterations.append([])
        return _Recorder(original.__get__(self, cls)(conn, schema), iterations[-1])

    monkeypatch.setattr(cls, "work", work)
    name = f"trips-{drv.name}"
    drv.knobs(name).limit = 10
    async with drv.host(pool_max_size=1):
        await drv.ping(name, 50)
        st = await drv.idle(name)
    assert st.batches == 5 and st.last_error is None, st.last_error
    calls = [c for it in iterations for c in it]
    # one pool connection, one server session: prepared once
    assert sum(c.startswith("send:PREPARE batchloop_book_") for c in calls) == 1, calls
    assert not [c for c in calls if c in ("begin", "commit") or c.startswith("execute:")], calls
    ours = [[c for c in it if not c.startswith("send:PREPARE")] for it in iterations]
    for it in ours:
        assert it[0].startswith(
            "send:BEGIN ISOLATION LEVEL READ COMMITTED; EXECUTE batchloop_book_"
        ), it
        assert it[-1].startswith("send:") and it[-1].endswith("COMMIT"), it
        assert sum(c.startswith("send:") for c in it) == 2, it
    # a batch's iteration: BEGIN with book_batch, the callables, a bare COMMIT (nothing to undo)
    assert sum(it[1:] == ["send:COMMIT"] for it in ours) == 5, iterations
