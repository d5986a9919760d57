"""Schema migrations: ordered plain SQL files under ``migrations/``, each applied once.

The runner is a plan (:mod:`batchloop.plans`): :func:`plan` decides, and the one driver
:func:`batchloop.plans.run` runs it for ``batchloop.migrate`` (async), ``batchloop.sync.migrate``
and ``batchloop migrate`` alike. Concurrent migrators are serialised by a transaction-level
advisory lock; everything happens in one transaction. ``sql/schema.sql`` is the schema the
migrations produce, in one file; :func:`schema_script` wraps it as ``batchloop sql`` prints it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

from . import sql
from .drivers.base import Row
from .errors import SchemaMissingError, SchemaTooNewError
from .plans import Plan, Query, Script
from .schema_name import check_schema

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


def _lock_key(schema: str) -> int:
    digest = hashlib.md5(f"batchloop-migrate:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def plan(schema: str) -> Plan[list[int]]:
    """The migration, as steps; runs inside one transaction that the caller of run opens.

    When every migration is applied it only reads, so a role that may not create anything (an
    application role, after the owner migrated) can run it, and a too-new schema is refused
    before any statement that such a role could not run.
    """
    readable = yield Query("migrations_readable", (schema,))
    if readable and next(iter(readable[0].values())):
        applied = _versions((yield Query("applied_migrations")))
        refuse_newer(max(applied, default=None), schema)
        if all(m.version in applied for m in migrations()):
            return []
    yield Script(_prologue(schema))
    # Again under the lock: a concurrent migrator may have committed meanwhile (each statement
    # sees what committed before it, in READ COMMITTED).
    applied = _versions((yield Query("applied_migrations")))
    refuse_newer(max(applied, default=None), schema)
    done = []
    for m in migrations():
        if m.version in applied:
            continue
        yield Script(_applied(schema, m.sql, [m]))
        done.append(m.version)
    if done:
        yield Script(_epilogue(schema))
    return done


def schema_script(schema: str) -> str:
    """The current schema (``sql/schema.sql``) as one script for a database without it, wrapped
    as the runner applies a migration, with every migration recorded: what ``batchloop sql``
    prints. tests/test_sql.py checks that it and the migrations make the same catalog."""
    check_schema(schema)
    header = (
        f"-- batchloop schema {schema!r} at version {code_version()}, for a database without it:\n"
        "-- batchloop/sql/schema.sql, the schema the migrations make (`batchloop migrate` applies\n"
        "-- the migrations themselves). Run it as one transaction: psql -v ON_ERROR_STOP=1 -f FILE"
    )
    body = _applied(schema, sql.schema().strip(), migrations())
    parts = [header, "BEGIN;", _prologue(schema), body, _epilogue(schema), "COMMIT;"]
    return "\n\n".join(parts) + "\n"


def upgrade_script(schema: str, from_version: int) -> str:
    """The migrations after ``from_version`` as one script, for an external migration tool
    (Alembic, Flyway, Django ``RunSQL``): what ``batchloop sql --from N`` prints. The same
    statements ``migrate`` runs; each applied migration is recorded, so the script fails (and
    its transaction rolls back) on a schema that already has one of them."""
    check_schema(schema)
    current = code_version()
    if not 0 <= from_version <= current:
        raise ValueError(
            f"--from {from_version}: the versions are 0 (no schema) to {current} (this "
            f"batchloop's); pass the version the database has: SELECT max(version) FROM "
            f"{schema}.schema_migrations"
        )
    pending = [m for m in migrations() if m.version > from_version]
    header = (
        f"-- batchloop schema {schema!r}: upgrade from version {from_version} to {current}"
        + (" (nothing to do)" if not pending else "")
        + ".\n-- Run it as one transaction: psql -v ON_ERROR_STOP=1 -f FILE"
    )
    if not pending:
        return header + "\n"
    parts = [header, "BEGIN;", _prologue(schema)]
    parts += [_applied(schema, m.sql, [m]) for m in pending]
    parts += [_epilogue(schema), "COMMIT;"]
    return "\n\n".join(parts) + "\n"


def _prologue(schema: str) -> str:
    return sql.script(
        schema,
        [
            ("migration_lock", (_lock_key(schema),)),
            ("create_schema", ()),
            ("create_migration_record", ()),
        ],
    )


def _applied(schema: str, text: str, recorded: Sequence[Migration]) -> str:
    """``text`` (a migration, or schema.sql) run on the schema, and ``recorded`` recorded."""
    record = sql.script(schema, [("record_migration", (m.version, m.name)) for m in recorded])
    return "\n".join([sql.script(schema, [("use_schema", ())]), text, record])


def _epilogue(schema: str) -> str:
    return sql.script(schema, [("set_schema_version", (code_version(),))])


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
