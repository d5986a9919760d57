"""asyncpg adapter of the control connection (:class:`~batchloop.drivers.base.ControlConnection`).

The control session (runtime/session.py) speaks only that protocol; this wraps one
``asyncpg.Connection`` and maps it, using the connection module's asyncpg helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from ..connect import check_dedicated_session, connect, server_keepalive, server_of
from .base import Row


class AsyncpgControl:
    """A control connection over ``conn``; ``dsn`` and ``connect_kwargs`` are what opened it
    (the dedicated-session check opens probe connections the same way)."""

    __slots__ = ("_conn", "_connect_kwargs", "_dsn", "_on_lost")

    def __init__(
        self,
        conn: asyncpg.Connection,
        *,
        dsn: str | None = None,
        connect_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._conn = conn
        self._dsn = dsn
        self._connect_kwargs = dict(connect_kwargs or {})
        self._on_lost: Callable[[object], None] | None = None

    @classmethod
    async def open(
        cls, dsn: str | None, *, timeout: float | None, max_wait: float, **connect_kwargs: Any
    ) -> AsyncpgControl:
        conn = await connect(dsn, timeout=timeout, max_wait=max_wait, **connect_kwargs)
        return cls(conn, dsn=dsn, connect_kwargs=connect_kwargs)

    @property
    def raw(self) -> asyncpg.Connection:
        return self._conn

    def server_pid(self) -> int:
        return int(self._conn.get_server_pid())

    def where(self) -> str:
        return server_of(self._conn)

    def watch(self, on_lost: Callable[[], None]) -> None:
        def on_terminated(_conn: object) -> None:
            on_lost()

        self._on_lost = on_terminated
        self._conn.add_termination_listener(on_terminated)

    def unwatch(self) -> None:
        if self._on_lost is not None:
            self._conn.remove_termination_listener(self._on_lost)
            self._on_lost = None

    async def fetch(self, sql: str, *args: Any, timeout: float) -> Sequence[Row]:
        rows = await self._conn.fetch(sql, *args, timeout=timeout)
        return rows  # type: ignore[return-value]  # Record is a read-only Mapping

    async def execute(self, sql: str, *, timeout: float) -> None:
        await self._conn.execute(sql, timeout=timeout)

    async def listen(self, channel: str, on_payload: Callable[[str], None]) -> None:
        def on_notify(_c: object, _pid: int, _channel: str, payload: object) -> None:
            on_payload(str(payload))

        await self._conn.add_listener(channel, on_notify)

    async def check_dedicated(self) -> None:
        await check_dedicated_session(self._conn, self._dsn, **self._connect_kwargs)

    async def keep_alive(self) -> None:
        await server_keepalive(self._conn)

    def terminate(self) -> None:
        if not self._conn.is_closed():
            self._conn.terminate()

    def is_closed(self) -> bool:
        return bool(self._conn.is_closed())

    async def close(self, *, timeout: float) -> None:
        await self._conn.close(timeout=timeout)
