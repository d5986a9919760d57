"""Host: runs the loops of the names it owns, listens for wake-ups, and monitors the rest.

One ``Host`` per process is typical; several in one process behave like separate processes
(each has its own control connection and so its own locks). See :mod:`batchloop.protocol` for
the whole protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Literal

import anyio
import asyncpg
from anyio.abc import TaskGroup, TaskStatus

from .. import observe
from ..connect import (
    AsyncpgPool,
    check_dedicated_session,
    connect,
    create_pool,
    create_psycopg_pool,
    libpq_params,
    redact,
    server_keepalive,
    server_of,
)
from ..drivers import _psycopg
from ..drivers.asyncpg import AsyncpgLoopDriver
from ..drivers.base import LoopDriver, Session
from ..drivers.errors import insufficient_privilege, server_error
from ..errors import BatchloopError, SchemaTooNewError
from ..migrations import check_version, code_version, refuse_newer
from ..observe import logs as observe_logs
from ..registry import host_running, import_modules, lookup, main_help, main_refs, refs
from ..schema_name import DEFAULT_SCHEMA, check_schema
from .loop import Bound, CallableMissing, LoopContext, NameLoop
from .session import Control

log = logging.getLogger("batchloop")

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


class Host:
    """Runs batchloop loops in this process while the ``async with`` block is open.

    ``dsn``: a libpq URL or key/value string; None uses the ``PG*`` environment variables.
    ``modules``: imported at start so their decorators register this host's callables.
    ``monitor_interval``: how often to look for names whose owner died (bounds crash failover).
    ``heartbeat_interval``: how often this host proves it is alive (must be well under any
    name's ``monitor_lag``). ``shutdown_grace``: how long an exiting host lets in-flight batches
    finish before cancelling (rolling back) them. ``startup_timeout``: how long to retry an
    unreachable database at start (None: for ever).

    ``driver``: which client library's connections the work queries and workers get:
    ``"asyncpg"`` (the default; an asyncpg pool) or ``"psycopg"`` (a psycopg_pool of
    ``psycopg.AsyncConnection`` in autocommit mode, inside the iteration's transaction). The
    control connection is asyncpg either way.

    ``control_dsn``: where the control connection (session advisory locks, LISTEN) connects,
    when ``dsn`` goes through a transaction-pooling proxy such as PgBouncer: a direct (or
    session-pooled) DSN of the same database. The pool, and so every batch, still uses ``dsn``,
    and its connections then default to ``statement_cache_size=0`` (asyncpg's named prepared
    statements do not survive transaction pooling). Without it, the control connection uses
    ``dsn``, and a host refuses to start through a transaction pooler (SessionRequiredError).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        modules: Iterable[str] = (),
        schema: str = DEFAULT_SCHEMA,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        monitor_interval: float = 0.5,
        heartbeat_interval: float = 1.0,
        shutdown_grace: float = 10.0,
        startup_timeout: float | None = 30.0,
        connect_kwargs: dict[str, Any] | None = None,
        control_dsn: str | None = None,
        driver: Literal["asyncpg", "psycopg"] = "asyncpg",
    ) -> None:
        if driver not in ("asyncpg", "psycopg"):
            raise ValueError(f"driver must be 'asyncpg' or 'psycopg', got {driver!r}")
        if driver == "psycopg":
            _psycopg.require('Host(driver="psycopg")', pool=True)
        self.driver = driver
        self.dsn = dsn
        self.control_dsn = control_dsn if control_dsn is not None else dsn
        self._pooled = control_dsn is not None
        """The pool goes through a transaction pooler: no prepared statements of ours."""
        self.modules = _module_names(modules)
        self.schema = check_schema(schema)
        if not 0 < monitor_interval <= 60 or not 0 < heartbeat_interval <= 60:
            raise ValueError("monitor_interval and heartbeat_interval must be in (0, 60] seconds")
        if pool_max_size < 1 or pool_min_size < 0 or pool_min_size > pool_max_size:
            raise ValueError("need 0 <= pool_min_size <= pool_max_size and pool_max_size >= 1")
        self.monitor_interval = monitor_interval
        self.heartbeat_interval = heartbeat_interval
        self.shutdown_grace = shutdown_grace
        self.startup_timeout = startup_timeout
        self.host_id = uuid.uuid4().hex[:16]
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self.application_name = f"batchloop/{self.host_id}"
        self._pool_sizes = (pool_min_size, pool_max_size)
        kwargs = dict(connect_kwargs or {})
        # Every connection carries the host's name, so a host that finds this one frozen can
        # end exactly its backends.
        kwargs["server_settings"] = {
            **kwargs.get("server_settings", {}),
            "application_name": self.application_name,
        }
        self._connect_kwargs = kwargs
        self._libpq = libpq_params(kwargs) if driver == "psycopg" else {}
        self._pool_kwargs = dict(kwargs)
        if control_dsn is not None:
            self._pool_kwargs.setdefault("statement_cache_size", 0)
        self._database: Any = None
        self._pool: Any = None
        self._tg: TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._session_tg: TaskGroup | None = None
        self._control: Control | None = None
        self._loops: dict[str, NameLoop] = {}
        self._claiming: set[str] = set()
        self._recheck: set[str] = set()
        self._unrunnable: set[tuple[str, str]] = set()
        self._foreign: set[str] = set()
        """Names whose callables this process lacks: wake-ups for them are left to others."""
        self._closing = False
        self._overflowed = False
        self._zombie_control: set[tuple[int, str | None]] = set()
        """Lost control sessions' (pid, server) that may live on at their server."""
        self._cannot_end: set[str] = set()
        """Frozen hosts this host's role may not terminate (already explained in the log)."""
        self._drained = anyio.Event()
        self._inbox_send, self._inbox = anyio.create_memory_object_stream[str](10_000)

    # ------------------------------------------------------------------ public surface

    @property
    def pool(self) -> Any:
        """The pool the host's loops borrow from, for your own transactions: an asyncpg
        ``Pool``, or with ``driver="psycopg"`` a ``psycopg_pool.AsyncConnectionPool``."""
        if self._pool is None:
            raise BatchloopError("the Host is not running: use `async with Host(...) as host`")
        return self._pool.pool

    def owned(self) -> set[str]:
        """Names whose loops this host runs right now."""
        return set(self._loops)

    async def __aenter__(self) -> Host:
        import_modules(self.modules)
        self._pool = await self._create_pool()
        driver: LoopDriver = AsyncpgLoopDriver()
        if self.driver == "psycopg":
            from ..drivers.psycopg import PsycopgLoopDriver

            driver = PsycopgLoopDriver()
        self._ctx = LoopContext(
            self._pool,
            self.schema,
            self._release,
            driver,
            prepare=not self._pooled,
            application_name=self.application_name,
        )
        try:
            async with self._pool.acquire() as conn:
                session = driver.session(conn, self.schema)
                found = await _schema_version(session)
                self._database = await session.fetchrow("database")
            check_version(found, self.schema)
            # The host's tasks live in a task of their own, so hosts can be entered and exited
            # in any order and a host failure never cancels the caller's code.
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._runner = asyncio.create_task(
                self._run(ready), name=f"batchloop-host-{self.host_id}"
            )
            await ready
        except BaseException:
            if self._runner is not None:
                self._runner.cancel()
                with contextlib.suppress(BaseException):
                    await self._runner
                self._runner = None
            await self._pool.close()
            self._pool = None
            raise
        host_running(+1)
        log.info("host %s started (schema %s, pid %d)", self.host_id, self.schema, self.pid)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._runner is not None and self._pool is not None
        self._closing = True
        try:
            with anyio.CancelScope(shield=True):
                released = [f"r:{loop.lock_key}:{loop.name}" for loop in self._loops.values()]
                await self._drain_loops()
                if self._tg is not None:
                    self._tg.cancel_scope.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._runner
                await self._say_goodbye(released)
        finally:
            host_running(-1)
            self._runner = None
            with anyio.CancelScope(shield=True):
                await self._pool.close()
            self._pool = None
            log.info("host %s stopped", self.host_id)
        return None

    async def _create_pool(self) -> Any:
        min_size, max_size = self._pool_sizes
        if self.driver == "asyncpg":
            return AsyncpgPool(
                await create_pool(
                    self.dsn,
                    timeout=self.startup_timeout,
                    min_size=min_size,
                    max_size=max_size,
                    **self._pool_kwargs,
                )
            )
        # Reach the server with asyncpg's retries and clear errors first (a bad database or
        # role fails at once, a server still starting is waited for); then open the pool.
        probe = await connect(self.dsn, timeout=self.startup_timeout, **self._connect_kwargs)
        await probe.close()
        return await create_psycopg_pool(
            self.dsn,
            timeout=self.startup_timeout,
            min_size=min_size,
            max_size=max_size,
            application_name=self.application_name,
            prepare=not self._pooled,
            params=self._libpq,
        )

    async def _run(self, ready: asyncio.Future[None]) -> None:
        # The host's own task (its loops inherit it): their log records name this host.
        observe_logs.enter(host=self.host_id)
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await tg.start(self._supervise)
                ready.set_result(None)
        except BaseException as exc:
            while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
                exc = exc.exceptions[0]
            if not ready.done():
                ready.set_exception(exc)
            elif not isinstance(exc, asyncio.CancelledError):
                log.critical("host %s crashed", self.host_id, exc_info=exc)
        finally:
            self._tg = None

    # ------------------------------------------------------------------ supervision

    async def _supervise(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a control session up; the loops live and die with it."""
        first = True
        while True:
            try:
                control = await self._open_control(self.startup_timeout if first else None)
            except SchemaTooNewError:
                raise  # for good: retrying cannot help, and this code must not run on it
            except Exception:
                if first:
                    raise
                log.exception("host %s: cannot reopen its control connection", self.host_id)
                await anyio.sleep(1.0)
                continue
            if not first:
                log.warning(
                    "host %s is back: control connection to %s (server started at epoch %s)",
                    self.host_id,
                    server_of(control.conn),
                    control.server,
                )
            self._control = control
            await self._end_zombies(control)
            try:
                async with anyio.create_task_group() as tg:
                    self._session_tg = tg
                    tg.start_soon(self._heartbeat, control)
                    tg.start_soon(self._dispatch)
                    await self._monitor_tick()
                    tg.start_soon(self._monitor)
                    if first:
                        await self._name_main_module_workers(control)
                        task_status.started()
                        first = False
                    await control.lost.wait()
                    tg.cancel_scope.cancel()
            except Exception:
                log.exception("host %s: control session failed", self.host_id)
            finally:
                self._session_tg = None
                self._loops.clear()
                self._claiming.clear()
                self._recheck.clear()
                if not self._closing:
                    control.fail()
                    with anyio.CancelScope(shield=True):
                        await self._forget_pool_connections()
            if self._closing:
                return
            self._zombie_control.add((control.pid, control.server))
            log.warning("host %s lost its control connection; reconnecting", self.host_id)

    async def _end_zombies(self, control: Control) -> None:
        """Before claiming anything, end what the previous session may have left running.

        A control connection or iteration lost to a half-open socket can live on at the server,
        holding the name's session lock or state row lock, and nobody else would end it: this
        host's heartbeat is fresh again. So the host ends them itself.
        """
        here = control.server
        old = [*self._zombie_control, *self._ctx.in_flight.items()]
        old_control = [pid for pid, server in self._zombie_control if server == here]
        old_work = [pid for pid, server in self._ctx.in_flight.items() if server == here]
        self._zombie_control.clear()
        self._ctx.in_flight.clear()
        if len(old) > len(old_control) + len(old_work):
            # After a failover: the old server's backends went with it (or are fenced off with
            # it), and the same pids here are other sessions' backends.
            log.info(
                "host %s: %d backend(s) of its lost session were on another server; not "
                "ending them here",
                self.host_id,
                len(old) - len(old_control) - len(old_work),
            )
        if not old_control and not old_work:
            return
        try:
            ended = await control.fetchval(
                "end_zombies", old_control, old_work, self.application_name, here
            )
        except Exception as exc:
            log.warning("host %s: ending its old backends failed: %s", self.host_id, exc)
            return
        if ended:
            log.warning("host %s ended %d backend(s) of its lost session", self.host_id, ended)

    async def _forget_pool_connections(self) -> None:
        """The control session is gone, and the server may be with it (a failover, a frozen
        primary): the pool's idle connections would hang the loops of the next session, so
        they are replaced as they are next acquired."""
        pool: Any = self._pool.pool if self._pool is not None else None
        try:
            if isinstance(self._pool, AsyncpgPool):
                await pool.expire_connections()
            elif self.driver == "psycopg" and self._tg is not None:
                self._tg.start_soon(self._drain_psycopg_pool, pool)
        except Exception as exc:
            log.debug("host %s: could not expire pool connections: %r", self.host_id, exc)

    async def _drain_psycopg_pool(self, pool: Any) -> None:
        with anyio.move_on_after(RECONNECT_OPEN_TIMEOUT):
            await pool.drain()

    async def _open_control(self, retry_for: float | None) -> Control:
        conn = await connect(
            self.control_dsn,
            timeout=retry_for,
            max_wait=4.0 if retry_for is not None else RECONNECT_MAX_WAIT,
            **self._connect_kwargs,
        )
        control = Control(conn, self.schema)
        try:
            with anyio.fail_after(RECONNECT_OPEN_TIMEOUT):
                await self._set_up_control(conn, control)
        except BaseException:
            control.fail()
            raise
        return control

    async def _set_up_control(self, conn: asyncpg.Connection, control: Control) -> None:
        try:
            await control.identify()
            await check_dedicated_session(conn, self.control_dsn, **self._connect_kwargs)
            await server_keepalive(conn)
            if self.control_dsn != self.dsn and dict(
                await control.fetchrow("database") or {}
            ) != dict(self._database or {}):
                raise BatchloopError(
                    f"control_dsn ({redact(self.control_dsn)}) and dsn ({redact(self.dsn)}) "
                    "lead to different databases"
                )
            # Every session, not just the first: a newer release may have migrated meanwhile.
            refuse_newer(await control.fetchval("check_version", code_version()), self.schema)
            await control.fetchval("register_host", self.host_id, self.hostname, self.pid)
            await control.listen(self._on_notify)
        except BaseException:
            control.fail()
            raise

    async def _heartbeat(self, control: Control) -> None:
        while True:
            await anyio.sleep(self._heartbeat_every())
            try:
                alive = await control.fetchval("heartbeat", self.host_id)
            except Exception as exc:
                log.warning("host %s: heartbeat failed: %s", self.host_id, exc)
                control.fail()
                return
            if alive is None:
                log.error("host %s was declared dead by another host; resetting", self.host_id)
                control.fail()
                return

    def _heartbeat_every(self) -> float:
        """Often enough that no owned name's ``monitor_lag`` can pass between two beats."""
        lags = [loop.bound.config.monitor_lag for loop in self._loops.values()]
        return max(0.1, min([self.heartbeat_interval, *(lag / 4 for lag in lags)]))

    # ------------------------------------------------------------------ wake-ups

    def _on_notify(self, payload: str) -> None:
        try:
            self._inbox_send.send_nowait(payload)
        except anyio.WouldBlock:
            # A dropped wake-up may have been for a name we own and sleep on (waiting); the
            # next monitor tick re-arms every owned loop from the database.
            self._overflowed = True

    async def _dispatch(self) -> None:
        async for payload in self._inbox:
            arrived = time.perf_counter()
            # Whatever else has arrived goes with it: a burst of pings is claimed in batches.
            payloads = [payload]
            with contextlib.suppress(anyio.WouldBlock):
                while len(payloads) < CLAIM_BATCH:
                    payloads.append(self._inbox.receive_nowait())
            wanted: list[str] = []
            for p in payloads:
                kind, _, rest = p.partition(":")
                _key, _, name = rest.partition(":")
                loop = self._loops.get(name)
                if kind == "s":
                    if loop is not None:
                        loop.stopping = True
                        loop.wake()
                elif kind in ("w", "r"):
                    if loop is not None:
                        loop.wake()
                    elif name not in self._foreign:
                        wanted.append(name)
            claimed = await self._claim(wanted, handoff=True) if wanted else None
            if claimed is not None:
                if observe.observers:
                    observe.emit_wake(
                        observe.WakeEvent(claimed.name, self.host_id, time.perf_counter() - arrived)
                    )
                # A wake-up is latency-bound: this task goes on into the loop it claimed at
                # once, and a new task takes over the dispatching (started after the loop's
                # first statement is on its way: starting a task costs more than sending it).
                asyncio.get_running_loop().call_soon(self._successor, self._session_tg)
                await claimed.run()
                return

    def _successor(self, tg: TaskGroup | None) -> None:
        """Start the dispatcher that replaces one which went on into a loop."""
        if tg is not None and tg is self._session_tg and not tg.cancel_scope.cancel_called:
            tg.start_soon(self._dispatch)

    # ------------------------------------------------------------------ claims

    async def _monitor(self) -> None:
        while True:
            await anyio.sleep(self.monitor_interval)
            await self._monitor_tick()

    async def _monitor_tick(self) -> None:
        """One query for all names: claim orphans, and end owners that stopped heartbeating."""
        control = self._control
        if control is None or self._closing or control.lost.is_set():
            return
        if self._overflowed:
            self._overflowed = False
            for loop in list(self._loops.values()):
                loop.wake()
        try:
            rows = await control.fetch("orphans", 500, refs("work_query"), refs("worker"))
        except Exception as exc:
            log.warning("host %s: monitor query failed: %s", self.host_id, exc)
            if not server_error(exc):
                control.fail()  # timed out or broken: start a fresh session
            return
        wanted: list[str] = []
        for row in rows:
            name, stale = row["name"], row["stale_owner"]
            if stale is not None:
                if stale != self.host_id:
                    await self._end_host(control, stale)
            elif self._runnable(row["work_query"], row["worker"]):
                self._foreign.discard(name)
                wanted.append(name)
        await self._claim(wanted)

    async def _name_main_module_workers(self, control: Control) -> None:
        try:
            rows = await control.fetch("main_module_workers")
        except Exception as exc:  # only a diagnostic: never a reason to fail the start
            log.debug("host %s: main_module_workers failed: %s", self.host_id, exc)
            return
        for row in rows:
            self._runnable(row["work_query"], row["worker"], row["name"])

    def _runnable(self, query_ref: str, worker_ref: str, name: str | None = None) -> bool:
        if lookup(query_ref, "work_query") and lookup(worker_ref, "worker"):
            return True
        if (query_ref, worker_ref) not in self._unrunnable:
            self._unrunnable.add((query_ref, worker_ref))
            unimportable = [
                ref for ref in main_refs(query_ref, worker_ref) if not lookup(ref, "worker")
                and not lookup(ref, "work_query")
            ]
            if unimportable:
                log.error(
                    "host %s cannot run %s: %s",
                    self.host_id,
                    repr(name) if name else "a worker",
                    main_help(unimportable),
                )
                return False
            log.warning(
                "host %s does not run %s / %s: not registered here (pass their module in "
                "Host(modules=...))",
                self.host_id,
                query_ref,
                worker_ref,
            )
        return False

    async def _end_host(self, control: Control, host_id: str) -> None:
        try:
            ended = await control.fetchval("terminate_host", f"batchloop/{host_id}")
            await control.fetchval("forget_host", host_id)
        except Exception as exc:
            if not insufficient_privilege(exc):
                log.error("host %s: could not end frozen host %s: %s", self.host_id, host_id, exc)
                return
            if host_id not in self._cannot_end:
                self._cannot_end.add(host_id)
                await self._explain_cannot_end(control, host_id, exc)
            return
        log.error(
            "host %s stopped heartbeating; terminated its %s backend(s) to take over its names",
            host_id,
            ended,
        )
        if observe.observers:
            observe.emit_ownership(
                observe.OwnershipEvent("takeover", self.host_id, other_host=host_id)
            )

    async def _explain_cannot_end(self, control: Control, host_id: str, exc: BaseException) -> None:
        """Said once per frozen host: it keeps its names until it resumes, dies or is ended."""
        try:
            row = await control.fetchrow("backend_roles", f"batchloop/{host_id}")
        except Exception:
            row = None
        me = row["me"] if row else "this host's role"
        theirs = row["theirs"] if row and row["theirs"] else "another role"
        log.error(
            "host %s cannot take over the names of frozen host %s: %s. Its backends run as %s, "
            "which %s may not terminate: GRANT pg_signal_backend TO %s (not enough for "
            "superuser backends), or run every host as the same role. Its names stay with it "
            "until it resumes or its connections drop.",
            self.host_id,
            host_id,
            exc,
            theirs,
            me,
            me,
        )

    def _session_alive(self) -> bool:
        control, tg = self._control, self._session_tg
        return (
            control is not None
            and tg is not None
            and not self._closing
            and not control.lost.is_set()
            and not tg.cancel_scope.cancel_called
        )

    async def _claim(
        self, names: list[str], unlock: list[int] | None = None, *, handoff: bool = False
    ) -> NameLoop | None:
        """Claim ``names`` (those not already ours), after unlocking ``unlock``: one statement
        per ``CLAIM_BATCH`` names; start their loops. With ``handoff``, one loop is returned
        for the caller to run instead of being started."""
        if not self._session_alive():
            return None
        names = list(dict.fromkeys(names))
        # A name being claimed already may have been looked at before this wake-up's ping
        # committed: look again once that claim is done (instead of waiting for the monitor).
        self._recheck.update(n for n in names if n in self._claiming)
        wanted = [n for n in names if n not in self._loops and n not in self._claiming]
        self._claiming.update(wanted)
        kept = None
        try:
            for i in range(0, max(len(wanted), 1), CLAIM_BATCH):
                chunk, first = wanted[i : i + CLAIM_BATCH], i == 0
                loop = await self._claim_batch(chunk, unlock if first else None, handoff and first)
                kept = kept or loop
        finally:
            self._claiming.difference_update(wanted)
        done = {n for n in self._recheck if n not in self._claiming}
        self._recheck -= done
        again = [n for n in done if n not in self._loops]
        if again:
            await self._claim(again)
        return kept

    async def _claim_batch(
        self, names: list[str], unlock: list[int] | None, handoff: bool
    ) -> NameLoop | None:
        control, tg = self._control, self._session_tg
        if (not names and not unlock) or not self._session_alive():
            return None
        assert control is not None and tg is not None
        try:
            rows = await control.fetch("claim_many", names, self.host_id, unlock or [])
        except Exception as exc:
            log.warning("host %s: claim of %s failed: %s", self.host_id, _some(names), exc)
            if not server_error(exc):
                # Did it take locks? Unknown: drop the session, and every lock.
                control.fail()
            elif unlock:
                # The claims gave back what they took; the unlocks may not have happened.
                await self._unlock(control, unlock)
            return None
        if not self._session_alive():
            await self._unlock(control, [row["lock_key"] for row in rows])
            return None
        refused: list[int] = []
        kept = None
        for row in rows:
            name = row["name"]
            try:
                bound = Bound.from_row(row)
            except Exception as exc:
                if isinstance(exc, CallableMissing):
                    self._runnable(row["work_query"], row["worker"], name)
                    self._foreign.add(name)
                else:
                    log.error("host %s: cannot run %r: %s", self.host_id, name, exc)
                refused.append(row["lock_key"])
                continue
            loop = NameLoop.claimed(self._ctx, name, row, bound)
            self._loops[name] = loop
            log.debug(
                "host %s claimed %r generation %d",
                self.host_id,
                name,
                loop.generation,
                extra={"batchloop_name": name, "batchloop_generation": loop.generation},
            )
            if observe.observers:
                observe.emit_ownership(
                    observe.OwnershipEvent("claim", self.host_id, name, loop.generation)
                )
            if handoff and kept is None:
                kept = loop
            else:
                tg.start_soon(loop.run, name=f"batchloop:{name}")
        if refused:
            await self._unlock(control, refused)
        return kept

    async def _unlock(self, control: Control, keys: list[int]) -> None:
        try:
            await control.fetchval("unlock", keys)
        except Exception as exc:
            log.warning("host %s: unlock failed (%s); dropping the session", self.host_id, exc)
            control.fail()

    async def _release(self, loop: NameLoop) -> None:
        """A loop ended: unlock its name and re-check it in one statement (a ping may have
        raced the loop's end)."""
        if self._loops.get(loop.name) is loop:
            del self._loops[loop.name]
            if observe.observers:
                observe.emit_ownership(
                    observe.OwnershipEvent("release", self.host_id, loop.name, loop.generation)
                )
        if not self._loops:
            self._drained.set()
        if not self._session_alive():
            return  # closing keeps locks for the goodbye; a dying session loses them anyway
        await self._claim([] if loop.unrunnable else [loop.name], unlock=[loop.lock_key])

    # ------------------------------------------------------------------ shutdown

    async def _drain_loops(self) -> None:
        """Let in-flight iterations finish within the grace period; loops exit when done."""
        if not self._loops:
            return
        self._drained = anyio.Event()
        for loop in list(self._loops.values()):
            loop.stopping = True
            loop.wake()
        with anyio.move_on_after(self.shutdown_grace):
            await self._drained.wait()

    async def _say_goodbye(self, released: list[str]) -> None:
        control = self._control
        self._control = None
        if control is None or control.is_closed():
            return
        try:
            here = [p for p, server in self._ctx.in_flight.items() if server == control.server]
            if here:
                # Iterations cancelled past the grace period: a backend may still be running
                # a statement its client gave up on, holding its name's row lock.
                await control.fetchval(
                    "end_zombies", [], here, self.application_name, control.server
                )
            await control.release_all(self.host_id, released)
        except Exception as exc:
            log.warning("host %s: goodbye failed: %s", self.host_id, exc)
        finally:
            await control.conn.close(timeout=2.0)


RECONNECT_MAX_WAIT = 0.5
"""The longest pause between reconnect attempts (plus up to 0.25 s of jitter): a failover's new
primary is up within seconds, and each attempt is cheap (refused, or one host's timeout)."""

RECONNECT_OPEN_TIMEOUT = 10.0
"""Setting up a new control session (a few quick statements) takes longer only on a bad server."""

CLAIM_BATCH = 50
"""Names claimed per statement: a burst of pings costs one round trip and one commit per this
many names, each statement stays far below the control connection's statement timeout, and
its subtransactions (one per name claimed) stay within PostgreSQL's per-backend cache of 64."""


def _some(names: list[str]) -> str:
    return repr(names[0]) if len(names) == 1 else f"{len(names)} names"


def _module_names(modules: object) -> tuple[str, ...]:
    # A str is an iterable too: "pkg.mod" would be imported letter by letter.
    if isinstance(modules, str | bytes) or not isinstance(modules, Iterable):
        raise TypeError(
            f"modules must be a list of module names, e.g. modules=[{modules!r}], "
            f"got {type(modules).__name__}"
        )
    names = tuple(modules)
    for module in names:
        if not isinstance(module, str):
            raise TypeError(
                f"modules must hold module names (str), e.g. 'myapp.jobs', got "
                f"{type(module).__name__} {module!r}"
            )
    return names


async def _schema_version(s: Session) -> int | None:
    try:
        value = await s.fetchval("schema_version")
    except BatchloopError:
        return None
    return int(value) if value is not None else None
