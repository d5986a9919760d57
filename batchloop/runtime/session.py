"""A host's control connection: the one connection that holds its names' session locks.

It also LISTENs for wake-ups, refreshes the host's heartbeat and runs the monitor's queries.
Losing it means losing every lock, so the host cancels all its loops when it goes.
Calls are serialised (a connection runs one statement at a time) and bounded by a timeout so
a half-open socket is noticed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import anyio
import asyncpg

from .. import sql
from ..drivers.base import Row, translate
from ..schema_name import channel

STATEMENT_TIMEOUT = 5.0
"""Control statements are all quick; one that takes longer means the connection is bad."""


class Control:
    def __init__(self, conn: asyncpg.Connection, schema: str) -> None:
        self.conn = conn
        self.schema = schema
        self._lock = anyio.Lock()
        self.pid: int = conn.get_server_pid()
        self.server: str | None = None
        """Which server the session is on (connect.SERVER_ID), read by ``identify``."""
        self.lost = anyio.Event()
        """Set once the connection is gone or distrusted; the host then starts a new session."""
        conn.add_termination_listener(self._on_terminated)

    def _on_terminated(self, _conn: object) -> None:
        self.lost.set()

    def detach(self) -> None:
        """Stop watching a connection we borrowed (``tick`` on the caller's connection)."""
        self.conn.remove_termination_listener(self._on_terminated)

    def fail(self) -> None:
        """Drop the connection now: the server frees its session locks at once."""
        self.lost.set()
        if not self.conn.is_closed():
            self.conn.terminate()

    async def identify(self) -> str:
        from ..connect import SERVER_ID

        async with self._lock:
            self.server = str(await self.conn.fetchval(SERVER_ID, timeout=STATEMENT_TIMEOUT))
        return self.server

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        async with self._lock:
            try:
                rows = await self.conn.fetch(
                    sql.query(name, self.schema), *args, timeout=STATEMENT_TIMEOUT
                )
            except asyncpg.PostgresError as exc:
                raise (translate(exc, self.schema) or exc) from exc
            return rows  # type: ignore[return-value]  # Record is a read-only Mapping

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        rows = await self.fetch(name, *args)
        return rows[0] if rows else None

    async def fetchval(self, name: str, *args: Any) -> Any:
        row = await self.fetchrow(name, *args)
        return next(iter(row.values())) if row else None

    async def listen(self, callback: Callable[[str], None]) -> None:
        def on_notify(_c: object, _pid: int, _channel: str, payload: object) -> None:
            callback(str(payload))

        async with self._lock:
            # asyncpg's LISTEN has no timeout of its own: a frozen server would hang us here.
            with anyio.fail_after(STATEMENT_TIMEOUT):
                await self.conn.add_listener(channel(self.schema), on_notify)

    async def release_all(self, host_id: str, payloads: list[str]) -> None:
        """Unlock every name, drop the host row and tell the other hosts, in one round trip."""
        async with self._lock:
            await self.conn.execute(
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
        return bool(self.conn.is_closed())
