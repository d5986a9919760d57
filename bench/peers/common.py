"""Helpers shared by the peer drivers."""

from __future__ import annotations

import contextlib

import asyncpg


async def settle(dsn: str, *tables: str) -> None:
    """VACUUM ANALYZE the freshly filled tables, then CHECKPOINT (best effort: it needs
    superuser or pg_checkpoint), so a drain does not start with a checkpoint due."""
    conn = await asyncpg.connect(dsn)
    try:
        for table in tables:
            await conn.execute(f"VACUUM ANALYZE {table}")
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def count(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()
