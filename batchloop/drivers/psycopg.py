"""psycopg 3 adapters: user connections (async) and scripts (sync)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import dict_row

from .. import sql
from .base import Row, translate


def _params(args: tuple[Any, ...]) -> dict[str, Any]:
    return {f"p{i}": value for i, value in enumerate(args, start=1)}


class PsycopgSession:
    """Over a psycopg AsyncConnection; runs in the caller's transaction, never commits."""

    __slots__ = ("_conn", "schema")

    def __init__(self, conn: psycopg.AsyncConnection[Any], schema: str) -> None:
        self._conn = conn
        self.schema = schema

    @property
    def raw(self) -> Any:
        return self._conn

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        try:
            async with self._conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(sql.pyformat(name, self.schema), _params(args))
                return await cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise (translate(exc, self.schema) or exc) from exc

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        rows = await self.fetch(name, *args)
        return rows[0] if rows else None

    async def fetchval(self, name: str, *args: Any) -> Any:
        row = await self.fetchrow(name, *args)
        return next(iter(row.values())) if row else None

    async def script(self, text: str) -> None:
        await self._conn.execute(text.encode())


class SyncPsycopgSession:
    """The same over a psycopg sync Connection, for scripts (:mod:`batchloop.sync`)."""

    __slots__ = ("_conn", "schema")

    def __init__(self, conn: psycopg.Connection[Any], schema: str) -> None:
        self._conn = conn
        self.schema = schema

    @property
    def raw(self) -> Any:
        return self._conn

    def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        try:
            with self._conn.cursor(row_factory=dict_row) as cur:
                cur.execute(sql.pyformat(name, self.schema), _params(args))
                return cur.fetchall() if cur.description else []
        except psycopg.Error as exc:
            raise (translate(exc, self.schema) or exc) from exc

    def fetchrow(self, name: str, *args: Any) -> Row | None:
        rows = self.fetch(name, *args)
        return rows[0] if rows else None

    def fetchval(self, name: str, *args: Any) -> Any:
        row = self.fetchrow(name, *args)
        return next(iter(row.values())) if row else None

    def script(self, text: str) -> None:
        self._conn.execute(text.encode())
