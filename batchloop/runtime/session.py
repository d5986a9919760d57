"""The control session: the one connection that holds a host's names' session locks.

Implements, of :mod:`batchloop.protocol`: the owner's side of "States" (the session advisory
locks), the host's heartbeat and "a control connection whose state is in doubt is terminated
at once" ("Notifications and their loss"), and the lost-session cases of "Recovery bounds"
(ending what a lost session may have left running at its server before claiming again).

It also LISTENs for wake-ups and runs the monitor's and the claims' queries. Losing it means
losing every lock, so the host cancels all its loops when it goes. Calls are serialised (a
connection runs one statement at a time) and bounded by a timeout so a half-open socket is
noticed. The driver is behind :class:`~batchloop.drivers.base.ControlConnection`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskGroup

from .. import sql
from ..drivers.base import ControlConnection, ControlConnector, Row, translate
from ..drivers.errors import server_error
from ..errors import BatchloopError
from ..migrations import code_version, refuse_newer
from ..schema_name import channel

log = logging.getLogger("batchloop")

STATEMENT_TIMEOUT = 5.0
"""Control statements are all quick; one that takes longer means the connection is bad."""

CLOSE_TIMEOUT = 2.0
"""How long a polite close may take before the connection is just dropped."""

RECONNECT_MAX_WAIT = 0.5
"""The longest pause between reconnect attempts (plus up to 0.25 s of jitter): a failover's new
primary is up within seconds, and each attempt is cheap (refused, or one host's timeout)."""

CONTROL_SETTINGS = "SET synchronous_commit TO off"
"""The control session's writes (claims, releases, heartbeats) commit without waiting for their
WAL flush: a claim is on a wake-up's critical path, and its flush was half of it. Visible at
once all the same; only a server crash can lose one, and the fence then still holds (protocol
section "Generations and fencing": it tests the owner with the generation). Whatever a loop
then commits flushes the claim with it, being later in the WAL."""

RECONNECT_OPEN_TIMEOUT = 10.0
"""Setting up a new control session (a few quick statements) takes longer only on a bad server."""


class Control:
    """One control connection, with named queries; ``lost`` once it is gone or distrusted."""

    def __init__(self, connection: ControlConnection, schema: str) -> None:
        self.connection = connection
        self.schema = schema
        self._lock = anyio.Lock()
        self.pid: int = connection.server_pid()
        self.server: str | None = None
        """Which server the session is on (connect.SERVER_ID), read by ``identify``."""
        self.lost = anyio.Event()
        """Set once the connection is gone or distrusted; the host then starts a new session."""
        self.beat_at: float | None = None
        """``time.monotonic()`` of the last successful heartbeat (for ``Host.health``)."""
        connection.watch(self.lost.set)

    @property
    def conn(self) -> Any:
        """The driver's own connection."""
        return self.connection.raw

    def detach(self) -> None:
        """Stop watching a connection we borrowed (``tick`` on the caller's connection)."""
        self.connection.unwatch()

    def fail(self) -> None:
        """Drop the connection now: the server frees its session locks at once."""
        self.lost.set()
        self.connection.terminate()

    async def identify(self) -> str:
        from ..connect import SERVER_ID

        async with self._lock:
            rows = await self.connection.fetch(SERVER_ID, timeout=STATEMENT_TIMEOUT)
            self.server = str(next(iter(rows[0].values())))
        return self.server

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        async with self._lock:
            try:
                return await self.connection.fetch(
                    sql.query(name, self.schema), *args, timeout=STATEMENT_TIMEOUT
                )
            except Exception as exc:
                ours = translate(exc, self.schema) if server_error(exc) else None
                if ours is None:
                    raise
                raise ours from exc

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        rows = await self.fetch(name, *args)
        return rows[0] if rows else None

    async def fetchval(self, name: str, *args: Any) -> Any:
        row = await self.fetchrow(name, *args)
        return next(iter(row.values())) if row else None

    async def listen(self, callback: Callable[[str], None]) -> None:
        async with self._lock:
            # asyncpg's LISTEN has no timeout of its own: a frozen server would hang us here.
            with anyio.fail_after(STATEMENT_TIMEOUT):
                await self.connection.listen(channel(self.schema), callback)

    async def release_all(self, host_id: str, payloads: list[str]) -> None:
        """Unlock every name, drop the host row and tell the other hosts, in one round trip."""
        async with self._lock:
            await self.connection.execute(
                sql.script(
                    self.schema,
                    [
                        ("unlock_all", ()),
                        ("forget_host", (host_id,)),
                        *(("notify", (channel(self.schema), p)) for p in payloads),
                    ],
                ),
                timeout=STATEMENT_TIMEOUT,
            )

    def is_closed(self) -> bool:
        return self.connection.is_closed()

    async def close(self) -> None:
        """Close it politely (the server then ends the session at once)."""
        await self.connection.close(timeout=CLOSE_TIMEOUT)


@dataclass(frozen=True)
class HostIdentity:
    """Who a host is, as its sessions register it and its backends are named."""

    host_id: str
    hostname: str
    pid: int
    application_name: str
    """On every connection the host opens: what ending exactly its backends goes by."""


class CurrentSession:
    """Which control session the host runs now. Written only by the host's supervision; the
    claims ledger, the wake-up dispatcher and the monitor read it."""

    def __init__(self) -> None:
        self.control: Control | None = None
        """The latest session's connection (kept after it is lost, for the goodbye)."""
        self.tasks: TaskGroup | None = None
        """The session's task group: loops and dispatchers started in it end with it."""
        self.closing = False
        """The host is exiting: claim nothing more."""

    def alive(self) -> bool:
        control, tasks = self.control, self.tasks
        return (
            control is not None
            and tasks is not None
            and not self.closing
            and not control.lost.is_set()
            and not tasks.cancel_scope.cancel_called
        )


class Sessions:
    """Opens a host's control sessions, one after another, and remembers what the lost ones
    may have left running at their server."""

    def __init__(
        self,
        connector: ControlConnector,
        schema: str,
        host: HostIdentity,
        *,
        on_notify: Callable[[str], None],
        database: Row | None = None,
        different_database: str = "",
    ) -> None:
        """``database``: when set, a session on another database (``fetchrow("database")``)
        is refused with ``different_database`` as the message."""
        self._connector = connector
        self._schema = schema
        self._host = host
        self._on_notify = on_notify
        self._database = database
        self._different_database = different_database
        self._lost_sessions: set[tuple[int, str | None]] = set()
        """Lost control sessions' (pid, server) that may live on at their server."""

    async def open(self, retry_for: float | None) -> Control:
        """A new, verified session, registered and listening."""
        connection = await self._connector(
            retry_for, 4.0 if retry_for is not None else RECONNECT_MAX_WAIT
        )
        control = Control(connection, self._schema)
        try:
            with anyio.fail_after(RECONNECT_OPEN_TIMEOUT):
                await self._set_up(control)
        except BaseException:
            control.fail()
            raise
        return control

    async def _set_up(self, control: Control) -> None:
        await control.identify()
        await control.connection.check_dedicated()
        await control.connection.keep_alive()
        await control.connection.execute(CONTROL_SETTINGS, timeout=STATEMENT_TIMEOUT)
        if self._database is not None:
            database = await control.fetchrow("database")
            if dict(database or {}) != dict(self._database):
                raise BatchloopError(self._different_database)
        # Every session, not just the first: a newer release may have migrated meanwhile.
        refuse_newer(await control.fetchval("check_version", code_version()), self._schema)
        host = self._host
        await control.fetchval("register_host", host.host_id, host.hostname, host.pid)
        await control.listen(self._on_notify)

    def lost(self, control: Control) -> None:
        """``control`` is gone: its backend may live on at its server behind a half-open
        socket, holding session locks."""
        self._lost_sessions.add((control.pid, control.server))

    async def end_zombies(self, control: Control, in_flight: dict[int, str | None]) -> None:
        """Before claiming anything, end what the previous session may have left running.

        A control connection or iteration lost to a half-open socket can live on at the server,
        holding the name's session lock or state row lock, and nobody else would end it: this
        host's heartbeat is fresh again. So the host ends them itself. ``in_flight``: the
        iterations' backends (pid -> server) when the session was lost; emptied here.
        """
        here = control.server
        old = [*self._lost_sessions, *in_flight.items()]
        old_control = [pid for pid, server in self._lost_sessions if server == here]
        old_work = [pid for pid, server in in_flight.items() if server == here]
        self._lost_sessions.clear()
        in_flight.clear()
        host_id = self._host.host_id
        if len(old) > len(old_control) + len(old_work):
            # After a failover: the old server's backends went with it (or are fenced off with
            # it), and the same pids here are other sessions' backends.
            log.info(
                "host %s: %d backend(s) of its lost session were on another server; not "
                "ending them here",
                host_id,
                len(old) - len(old_control) - len(old_work),
            )
        if not old_control and not old_work:
            return
        try:
            ended = await control.fetchval(
                "end_zombies", old_control, old_work, self._host.application_name, here
            )
        except Exception as exc:
            log.warning("host %s: ending its old backends failed: %s", host_id, exc)
            return
        if ended:
            log.warning("host %s ended %d backend(s) of its lost session", host_id, ended)

    async def say_goodbye(
        self, control: Control, in_flight: dict[int, str | None], released: list[str]
    ) -> None:
        """The host is exiting: end its iterations still running at the server, unlock every
        name, drop the host row, NOTIFY ``released``, and close the session."""
        if control.is_closed():
            return
        host = self._host
        try:
            here = [pid for pid, server in in_flight.items() if server == control.server]
            if here:
                # Iterations cancelled past the grace period: a backend may still be running
                # a statement its client gave up on, holding its name's row lock.
                await control.fetchval(
                    "end_zombies", [], here, host.application_name, control.server
                )
            await control.release_all(host.host_id, released)
        except Exception as exc:
            log.warning("host %s: goodbye failed: %s", host.host_id, exc)
        finally:
            await control.close()


@dataclass(slots=True)
class Shares:
    """How the names spread over the live hosts, as the last heartbeat saw it."""

    owned: Callable[[], int]
    """How many names this host owns now."""
    others: int = 0
    """Other live hosts."""
    others_owned: int = 0
    """Names they own between them, as of their own last heartbeats."""


async def heartbeat(
    control: Control,
    host_id: str,
    every: Callable[[], float],
    shares: Shares | None = None,
) -> None:
    """Prove this host alive every ``every()`` seconds until the session is distrusted; with
    ``shares``, publish how many names it owns and learn the other hosts' counts."""
    while True:
        await anyio.sleep(every())
        try:
            row = await control.fetchrow(
                "heartbeat", host_id, 0 if shares is None else shares.owned()
            )
        except Exception as exc:
            log.warning("host %s: heartbeat failed: %s", host_id, exc)
            control.fail()
            return
        alive = None if row is None else row["host_id"]
        if row is not None and shares is not None:
            shares.others, shares.others_owned = row["others"], row["others_owned"]
        if alive is None:
            log.error("host %s was declared dead by another host; resetting", host_id)
            control.fail()
            return
        control.beat_at = time.monotonic()
