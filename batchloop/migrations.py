"""Schema migrations: ordered plain SQL files under ``migrations/``, each applied once.

The runner is written once as a generator of steps (sans-IO) and driven by an async or a sync
session, so asyncpg, psycopg and the CLI share one implementation. Concurrent migrators are
serialised by a transaction-level advisory lock; everything happens in one transaction.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from .drivers import session_for
from .drivers.asyncpg import AsyncpgSession
from .drivers.base import Row, Session
from .errors import SchemaMissingError, SchemaTooNewError
from .schema_name import DEFAULT_SCHEMA, check_schema, quote_schema

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


def _migrations_dir() -> Path:
    packaged = files("batchloop").joinpath("migrations")
    if packaged.is_dir():  # installed wheel
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "migrations"  # source checkout


@cache
def migrations() -> tuple[Migration, ...]:
    found = []
    for path in sorted(_migrations_dir().iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise RuntimeError(f"migrations must be numbered 0001, 0002, ... without gaps: {versions}")
    return tuple(found)


def code_version() -> int:
    return len(migrations())


@dataclass(frozen=True, slots=True)
class Script:
    sql: str


@dataclass(frozen=True, slots=True)
class Query:
    name: str


Step = Script | Query


def _lock_key(schema: str) -> int:
    digest = hashlib.md5(f"batchloop-migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def plan(schema: str) -> Generator[Step, Sequence[Row] | None, list[int]]:
    """The migration, as steps; runs inside one transaction that the driver opens."""
    q = quote_schema(schema)
    yield Script(
        f"SELECT pg_advisory_xact_lock({_lock_key(schema)});\n"
        f"CREATE SCHEMA IF NOT EXISTS {q};\n"
        f"CREATE TABLE IF NOT EXISTS {q}.schema_migrations (\n"
        "    version integer PRIMARY KEY, name text NOT NULL,\n"
        "    applied_at timestamptz NOT NULL DEFAULT now());"
    )
    rows = yield Query("applied_migrations")
    applied = {int(r["version"]) for r in rows or ()}
    latest = code_version()
    if applied and max(applied) > latest:
        raise SchemaTooNewError(
            f"schema {schema!r} is at version {max(applied)}, newer than this batchloop "
            f"(version {latest}): upgrade batchloop"
        )
    done = []
    for m in migrations():
        if m.version in applied:
            continue
        yield Script(
            f"SET LOCAL search_path TO {q};\n{m.sql}\n"
            f"INSERT INTO {q}.schema_migrations (version, name) VALUES ({m.version}, '{m.name}');"
        )
        done.append(m.version)
    if done:
        yield Script(
            f"CREATE OR REPLACE FUNCTION {q}.schema_version() RETURNS integer "
            f"LANGUAGE sql IMMUTABLE AS 'SELECT {latest}';"
        )
    return done


def check_version(found: int | None, schema: str) -> None:
    """Refuse a schema that is missing, behind or ahead of this code."""
    latest = code_version()
    if found is None or found < latest:
        where = "missing" if found is None else f"at version {found}, this code needs {latest}"
        raise SchemaMissingError(
            f"the batchloop schema {check_schema(schema)!r} is {where}: run `batchloop migrate` "
            "(or `await batchloop.migrate(dsn)`)"
        )
    if found > latest:
        raise SchemaTooNewError(
            f"the batchloop schema {schema!r} is at version {found}, newer than this code "
            f"(version {latest}): upgrade batchloop"
        )


async def migrate(dsn_or_conn: Any = None, *, schema: str = DEFAULT_SCHEMA) -> list[int]:
    """Create or upgrade the batchloop schema; returns the versions applied (idempotent).

    ``dsn_or_conn``: a DSN string (None: the ``PG*`` environment), or an asyncpg Connection or
    psycopg AsyncConnection. Safe when several processes migrate at once.
    """
    check_schema(schema)
    if dsn_or_conn is None or isinstance(dsn_or_conn, str):
        from .connect import connect

        conn = await connect(dsn_or_conn, timeout=10.0)
        try:
            return await migrate(conn, schema=schema)
        finally:
            await conn.close()
    async with session_for(dsn_or_conn, schema) as s:
        if await _up_to_date(s, schema):
            return []
        raw = s.raw
        if isinstance(s, AsyncpgSession):
            async with raw.transaction():
                return await _drive(plan(schema), s)
        async with raw.transaction():
            return await _drive(plan(schema), s)


async def _up_to_date(s: Session, schema: str) -> bool:
    """Every migration applied: then ``migrate`` only reads, so a role that may not create
    anything (an application role, after the owner migrated) can call it at start-up."""
    if not await s.fetchval("migrations_readable", schema):
        return False
    applied = {int(r["version"]) for r in await s.fetch("applied_migrations")}
    latest = code_version()
    if applied and max(applied) > latest:
        raise SchemaTooNewError(
            f"schema {schema!r} is at version {max(applied)}, newer than this batchloop "
            f"(version {latest}): upgrade batchloop"
        )
    return all(m.version in applied for m in migrations())


async def _drive(steps: Generator[Step, Sequence[Row] | None, list[int]], s: Session) -> list[int]:
    reply: Sequence[Row] | None = None
    try:
        while True:
            step = steps.send(reply)
            if isinstance(step, Script):
                await s.script(step.sql)
                reply = None
            else:
                reply = await s.fetch(step.name)
    except StopIteration as done:
        result: list[int] = done.value
        return result
