"""Host: runs the loops of the names it owns, listens for wake-ups, and monitors the rest.

One ``Host`` per process is typical; several in one process behave like separate processes
(each has its own control connection and so its own locks). See :mod:`batchloop.protocol` for
the whole protocol.

This module is the composition root of the runtime and implements the host's own part of
:mod:`batchloop.protocol` ("Recovery bounds": one control session at a time, a fresh one after
a loss; a host exiting normally finishes in-flight batches within ``shutdown_grace``, then
releases its locks and NOTIFYs ``r:``). The rest is in rooms of its own: the control session
(:mod:`.session`), wake-ups (:mod:`.wakeups`), the claims ledger (:mod:`.claims`) and the
monitor (:mod:`.monitor`).
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
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio.abc import TaskGroup, TaskStatus

from ..connect import (
    ASYNCPG_RESET,
    PSYCOPG_RESET,
    AsyncpgPool,
    connect,
    create_pool,
    create_psycopg_pool,
    libpq_params,
    redact,
)
from ..drivers import _psycopg
from ..drivers.asyncpg import AsyncpgLoopDriver
from ..drivers.asyncpg_control import AsyncpgControl
from ..drivers.base import LoopDriver, Session
from ..errors import BatchloopError, SchemaTooNewError
from ..migrations import check_version
from ..models import Health
from ..observe import logs as observe_logs
from ..registry import host_running, import_modules
from ..schema_name import DEFAULT_SCHEMA, check_schema
from .claims import Claims
from .loop import LoopContext
from .monitor import Monitor
from .session import RECONNECT_OPEN_TIMEOUT, CurrentSession, HostIdentity, Sessions, heartbeat
from .wakeups import Dispatcher, encode

log = logging.getLogger("batchloop")

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

_running: ContextVar[Host | None] = ContextVar("batchloop_host", default=None)


def current_host() -> Host | None:
    """The Host whose task runs the caller (its loops' work queries and workers), if any:
    what batchloop.jobs starts handlers on once a lease commits."""
    return _running.get()


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
        self._identity = HostIdentity(self.host_id, self.hostname, self.pid, self.application_name)
        # The rooms: each owns its state; they meet through the current session.
        self._current = CurrentSession()
        self._claims = Claims(self._current, self.host_id)
        self._wakeups = Dispatcher(self._current, self._claims)
        self._monitor = Monitor(
            self._current,
            self._claims,
            self.host_id,
            monitor_interval,
            dropped_wakeups=self._wakeups.take_dropped,
        )
        self._sessions: Sessions | None = None
        self._close_hooks: list[Callable[[float], Awaitable[None]]] = []

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
        return set(self._claims.loops)

    def health(self) -> Health:
        """This host's own view of its health (no I/O): whether its control connection is
        alive, how old its last heartbeat is, and the names it runs."""
        control = self._current.control
        connected = self._runner is not None and self._current.alive()
        age = None
        if control is not None and control.beat_at is not None:
            age = time.monotonic() - control.beat_at
        problems = []
        if self._runner is None:
            problems.append("the host is not running (use `async with Host(...)`)")
        elif not connected:
            problems.append("the control connection is down; reconnecting")
        # Other hosts take a name over once its owner's heartbeat is older than its monitor_lag
        # (at least 1 s); three missed beats mean this host is about to lose its names.
        limit = max(3 * self._heartbeat_every(), 5.0)
        if connected and age is not None and age > limit:
            problems.append(f"the last heartbeat succeeded {age:.1f} s ago (limit {limit:.0f} s)")
        return Health(
            ok=not problems,
            connected=connected,
            heartbeat_age=age,
            owned=sorted(self._claims.loops),
            problems=problems,
        )

    async def __aenter__(self) -> Host:
        import_modules(self.modules)
        self._pool = await self._create_pool()
        driver: LoopDriver = AsyncpgLoopDriver()
        reset = ASYNCPG_RESET  # the reset the pool's release runs, for the loops' COMMITs
        if self.driver == "psycopg":
            from ..drivers.psycopg import PsycopgLoopDriver

            driver, reset = PsycopgLoopDriver(), PSYCOPG_RESET
        self._ctx = LoopContext(
            self._pool,
            self.schema,
            self._claims.release,
            driver,
            owner=self.host_id,
            prepare=not self._pooled,
            application_name=self.application_name,
            polls=anyio.Semaphore(max(1, self._pool_sizes[1] // 2)),
            reset=reset,
        )
        try:
            async with self._pool.acquire() as conn:
                session = driver.session(conn, self.schema)
                found = await _schema_version(session)
                self._database = await session.fetchrow("database")
            check_version(found, self.schema)
            self._claims.ctx = self._ctx
            self._sessions = Sessions(
                self._connect_control,
                self.schema,
                self._identity,
                on_notify=self._on_notify,
                database=dict(self._database or {}) if self.control_dsn != self.dsn else None,
                different_database=(
                    f"control_dsn ({redact(self.control_dsn)}) and dsn ({redact(self.dsn)}) "
                    "lead to different databases"
                ),
            )
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
        assert self._sessions is not None
        self._current.closing = True
        try:
            with anyio.CancelScope(shield=True):
                released = [encode("r", name) for name in self._claims.loops]
                await self._claims.drain(self.shutdown_grace)
                for hook in self._close_hooks:
                    try:
                        await hook(self.shutdown_grace)
                    except Exception:
                        log.exception("host %s: a close hook failed", self.host_id)
                if self._tg is not None:
                    self._tg.cancel_scope.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._runner
                control, self._current.control = self._current.control, None
                if control is not None:
                    await self._sessions.say_goodbye(control, self._ctx.in_flight, released)
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
        _running.set(self)
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

    def lend(self) -> AbstractAsyncContextManager[Any]:
        """A pool connection for work beside the loops (batchloop.jobs' completions)."""
        if self._pool is None:
            raise BatchloopError("the Host is not running: use `async with Host(...) as host`")
        return self._pool.acquire()  # type: ignore[no-any-return]

    def poke(self, name: str) -> bool:
        """Cut short the sleep of this host's loop for ``name`` (no I/O); False if none here."""
        loop = self._claims.loops.get(name)
        if loop is not None:
            loop.wake()
        return loop is not None

    def on_close(self, hook: Callable[[float], Awaitable[None]]) -> None:
        """Await ``hook(shutdown_grace)`` on exit, once the loops are drained and before the
        pool closes (batchloop.jobs waits there for its handlers)."""
        self._close_hooks.append(hook)

    # ------------------------------------------------------------------ supervision

    async def _supervise(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a control session up; the loops live and die with it."""
        assert self._sessions is not None
        current, first = self._current, True
        while True:
            try:
                control = await self._sessions.open(self.startup_timeout if first else None)
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
                    control.connection.where(),
                    control.server,
                )
            current.control = control
            await self._sessions.end_zombies(control, self._ctx.in_flight)
            try:
                async with anyio.create_task_group() as tg:
                    current.tasks = tg
                    tg.start_soon(
                        heartbeat, control, self.host_id, self._heartbeat_every, self._claims.shares
                    )
                    tg.start_soon(self._wakeups.run)
                    await self._monitor.tick()
                    tg.start_soon(self._monitor.run)
                    if first:
                        await self._claims.explain_main_module_workers(control)
                        task_status.started()
                        first = False
                    await control.lost.wait()
                    tg.cancel_scope.cancel()
            except Exception:
                log.exception("host %s: control session failed", self.host_id)
            finally:
                current.tasks = None
                self._claims.forget_all()
                if not current.closing:
                    control.fail()
                    with anyio.CancelScope(shield=True):
                        await self._forget_pool_connections()
            if current.closing:
                return
            self._sessions.lost(control)
            log.warning("host %s lost its control connection; reconnecting", self.host_id)

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

    async def _connect_control(self, retry_for: float | None, max_wait: float) -> AsyncpgControl:
        return await AsyncpgControl.open(
            self.control_dsn, timeout=retry_for, max_wait=max_wait, **self._connect_kwargs
        )

    def _heartbeat_every(self) -> float:
        """Often enough that no owned name's ``monitor_lag`` can pass between two beats."""
        lags = [loop.config.monitor_lag for loop in self._claims.loops.values()]
        return max(0.1, min([self.heartbeat_interval, *(lag / 4 for lag in lags)]))

    def _on_notify(self, payload: str) -> None:
        self._wakeups.on_notify(payload)


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
