"""Schema migrations: ordered plain SQL files under ``migrations/``, each applied once.

The runner is written once as a generator of steps (sans-IO), and one driver,
:func:`run_plan`, feeds it from an async session or (through :func:`run_blocking`) a sync one,
so asyncpg, psycopg, ``batchloop.sync`` and the CLI share every decision. Concurrent migrators
are serialised by a transaction-level advisory lock; everything happens in one transaction.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Coroutine, Generator, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol, TypeVar

from .drivers import session_for
from .drivers.base import Row
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
    """A named query (batchloop/sql/queries.sql); the reply is its rows."""

    name: str
    args: tuple[Any, ...] = ()


Step = Script | Query


def _lock_key(schema: str) -> int:
    digest = hashlib.md5(f"batchloop-migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def plan(schema: str) -> Generator[Step, Sequence[Row] | None, list[int]]:
    """The migration, as steps; runs inside one transaction that the caller of run_plan opens.

    When every migration is applied it only reads, so a role that may not create anything (an
    application role, after the owner migrated) can run it, and a too-new schema is refused
    before any statement that such a role could not run.
    """
    q = quote_schema(schema)
    readable = yield Query("migrations_readable", (schema,))
    if readable and next(iter(readable[0].values())):
        applied = _versions((yield Query("applied_migrations")))
        refuse_newer(max(applied, default=None), schema)
        if all(m.version in applied for m in migrations()):
            return []
    yield Script(
        f"SELECT pg_advisory_xact_lock({_lock_key(schema)});\n"
        f"CREATE SCHEMA IF NOT EXISTS {q};\n"
        f"CREATE TABLE IF NOT EXISTS {q}.schema_migrations (\n"
        "    version integer PRIMARY KEY, name text NOT NULL,\n"
        "    applied_at timestamptz NOT NULL DEFAULT now());"
    )
    # Again under the lock: a concurrent migrator may have committed meanwhile (each statement
    # sees what committed before it, in READ COMMITTED).
    applied = _versions((yield Query("applied_migrations")))
    refuse_newer(max(applied, default=None), schema)
    latest = code_version()
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


def _versions(rows: Sequence[Row] | None) -> set[int]:
    return {int(r["version"]) for r in rows or ()}


def check_version(found: int | None, schema: str) -> None:
    """Refuse a schema that is missing, behind or ahead of this code."""
    latest = code_version()
    if found is None or found < latest:
        where = "missing" if found is None else f"at version {found}, this code needs {latest}"
        raise SchemaMissingError(
            f"the batchloop schema {check_schema(schema)!r} is {where}: run `batchloop migrate` "
            "(or `await batchloop.migrate(dsn)`)"
        )
    refuse_newer(found, schema)


def refuse_newer(recorded: Any, schema: str) -> None:
    """Raise SchemaTooNewError when ``recorded`` (the newest migration in the database's
    record, None if none) is newer than this code: a newer release has migrated it."""
    latest = code_version()
    if recorded is not None and int(recorded) > latest:
        raise SchemaTooNewError(
            f"the batchloop schema {schema!r} is at version {recorded}, newer than this code "
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
    async with session_for(dsn_or_conn, schema) as s, s.raw.transaction():
        return await run_plan(s, schema)


class MigrationSession(Protocol):
    """What running the plan needs of a connection (async, or sync behind run_blocking)."""

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]: ...

    async def script(self, sql: str) -> None: ...


async def run_plan(s: MigrationSession, schema: str) -> list[int]:
    """Run :func:`plan` on ``s``, inside the transaction the caller opened; the only driver of
    the plan (``migrate``, ``batchloop.sync.migrate`` and ``batchloop migrate`` all use it)."""
    steps = plan(schema)
    reply: Sequence[Row] | None = None
    try:
        while True:
            step = steps.send(reply)
            if isinstance(step, Script):
                await s.script(step.sql)
                reply = None
            else:
                reply = await s.fetch(step.name, *step.args)
    except StopIteration as done:
        result: list[int] = done.value
        return result


T = TypeVar("T")


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (its awaits are blocking calls), without
    an event loop, so sync code can share an async implementation."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a blocking coroutine suspended")
