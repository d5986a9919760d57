"""asyncpg adapter: the runtime driver of hosts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg

from .. import sql
from .base import Row, translate


class AsyncpgSession:
    __slots__ = ("_conn", "schema")

    def __init__(self, conn: Any, schema: str) -> None:
        self._conn = conn
        self.schema = schema

    @property
    def raw(self) -> Any:
        return self._conn

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        try:
            rows: Sequence[Row] = await self._conn.fetch(sql.query(name, self.schema), *args)
        except asyncpg.PostgresError as exc:
            raise (translate(exc, self.schema) or exc) from exc
        return rows

    async def fetchrow(self, name: str, *args: Any) -> Row | None:
        try:
            row: Row | None = await self._conn.fetchrow(sql.query(name, self.schema), *args)
        except asyncpg.PostgresError as exc:
            raise (translate(exc, self.schema) or exc) from exc
        return row

    async def fetchval(self, name: str, *args: Any) -> Any:
        try:
            return await self._conn.fetchval(sql.query(name, self.schema), *args)
        except asyncpg.PostgresError as exc:
            raise (translate(exc, self.schema) or exc) from exc

    async def script(self, text: str) -> None:
        await self._conn.execute(text)
