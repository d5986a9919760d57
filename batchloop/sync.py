"""The user-facing calls for a psycopg *sync* ``Connection``, for scripts and synchronous apps.

Same names, signatures and return values as the async API in :mod:`batchloop`::

    import psycopg
    import batchloop.sync as bls

    bls.migrate(dsn)
    with psycopg.connect(dsn) as conn:          # commits when the block ends
        conn.execute("INSERT INTO events(value) VALUES (1)")
        bls.ping(conn, "events", next_events, handle_events)

Every call runs in the caller's transaction and never commits for them (psycopg's sync
connections open a transaction implicitly unless ``autocommit=True``): ``ping``, ``stop`` and
``start`` take effect when the caller commits. ``migrate`` is the exception that manages its own
transaction (see its docstring). The work query and worker passed to ``ping`` are the same
async, decorated functions a host runs; ``ping`` only records their names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from . import calls
from .calls import PingResult
from .connect import ConnectError, redact
from .drivers._psycopg import require
from .dsn import parse, scrub
from .models import Config, HostStatus, WorkerStatus
from .plans import Plan, run_sync
from .schema_name import DEFAULT_SCHEMA, check_schema

if TYPE_CHECKING:
    import psycopg

    from .drivers.psycopg import SyncPsycopgSession

log = logging.getLogger("batchloop")
T = TypeVar("T")

__all__ = [
    *("connect", "list_hosts", "list_workers", "migrate", "ping", "start", "status", "stop"),
    "wake",
]


def connect(
    dsn: str | None = None, *, autocommit: bool = False, timeout: float = 10.0
) -> psycopg.Connection[Any]:
    """A psycopg sync connection, raising :class:`batchloop.connect.ConnectError` on failure.

    ``dsn``: a libpq URL or key/value string; None (or "") uses the ``PG*`` environment variables.
    The error message hides any password in the DSN.
    """
    require("batchloop.sync")
    import psycopg

    parse(dsn or "")  # a DsnError naming no DSN value, rather than libpq's quoting one
    try:
        return psycopg.connect(
            dsn or "", autocommit=autocommit, connect_timeout=max(1, int(timeout))
        )
    except psycopg.Error as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConnectError(
            scrub(f"cannot connect to PostgreSQL at {redact(dsn)}: {detail}", dsn)
        ) from exc


def _session(conn: psycopg.Connection[Any], schema: str) -> SyncPsycopgSession:
    require("batchloop.sync")
    import psycopg

    from .drivers.psycopg import SyncPsycopgSession
    from .drivers.sqlalchemy import is_sqlalchemy, sync_driver_connection

    if is_sqlalchemy(conn):
        conn = sync_driver_connection(conn)
    if not isinstance(conn, psycopg.Connection):
        raise TypeError(
            f"conn must be a psycopg (sync) Connection, or a SQLAlchemy Connection or Session "
            f"on postgresql+psycopg, got {type(conn).__name__} "
            "(for asyncpg or a psycopg AsyncConnection use the async batchloop API)"
        )
    return SyncPsycopgSession(conn, check_schema(schema))


def ping(
    conn: psycopg.Connection[Any],
    name: str,
    work_query: Callable[..., Any],
    worker: Callable[..., Any],
    *,
    config: Config | None = None,
    schema: str = DEFAULT_SCHEMA,
) -> PingResult:
    """Make sure the loop ``name`` will see the work this transaction inserts.

    Call it in the inserting transaction; it takes effect when that transaction commits. See
    :func:`batchloop.ping`. Raises before any SQL runs when a callable is not registered.
    """
    return _run(conn, schema, calls.ping(name, work_query, worker, config, schema))


def stop(conn: psycopg.Connection[Any], name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Stop ``name`` (see :func:`batchloop.stop`); effective once the caller's transaction commits.

    Returns False when there is no such worker.
    """
    return _run(conn, schema, calls.stop(name, schema))


def start(conn: psycopg.Connection[Any], name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Resume a stopped worker (see :func:`batchloop.start`); returns False when there is none."""
    return _run(conn, schema, calls.start(name, schema))


def wake(conn: psycopg.Connection[Any], name: str, *, schema: str = DEFAULT_SCHEMA) -> bool:
    """Sync :func:`batchloop.wake`: run ``name``'s loop now; False if unknown or stopped."""
    return _run(conn, schema, calls.wake(name, schema))


def list_hosts(conn: psycopg.Connection[Any], *, schema: str = DEFAULT_SCHEMA) -> list[HostStatus]:
    """Sync :func:`batchloop.list_hosts`."""
    return _run(conn, schema, calls.list_hosts(schema))


def status(
    conn: psycopg.Connection[Any], name: str, *, schema: str = DEFAULT_SCHEMA
) -> WorkerStatus | None:
    """The worker ``name``, or None if no ping ever created it."""
    return _run(conn, schema, calls.status(name, schema))


def list_workers(
    conn: psycopg.Connection[Any], *, schema: str = DEFAULT_SCHEMA
) -> list[WorkerStatus]:
    """Every worker, ordered by name."""
    return _run(conn, schema, calls.list_workers(schema))


def migrate(
    dsn_or_conn: str | psycopg.Connection[Any] | None = None, *, schema: str = DEFAULT_SCHEMA
) -> list[int]:
    """Create or upgrade the batchloop schema; returns the versions applied (idempotent).

    ``dsn_or_conn``: a DSN string (None: the ``PG*`` environment), which is opened, migrated,
    committed and closed; or a psycopg sync Connection, migrated inside ``conn.transaction()``:
    that commits when no transaction was open on it, and otherwise becomes a savepoint of the
    caller's transaction, for the caller to commit. Safe when several processes migrate at once.
    """
    check_schema(schema)
    if dsn_or_conn is None or isinstance(dsn_or_conn, str):
        with connect(dsn_or_conn, autocommit=True) as conn:
            return migrate(conn, schema=schema)
    plan = calls.migrate(schema)
    s = _session(dsn_or_conn, schema)
    with dsn_or_conn.transaction():
        done = run_sync(s, plan)
    if done:
        log.info("migrated schema %s: applied %s", schema, done)
    return done


def _run(conn: psycopg.Connection[Any], schema: str, plan: Plan[T]) -> T:
    return run_sync(_session(conn, schema), plan)
