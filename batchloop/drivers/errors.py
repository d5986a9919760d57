"""What a driver's exception means to the runtime: the one place that knows both drivers'
exception classes, so the loop, the host and tick classify failures without importing either.
"""

from __future__ import annotations

import asyncpg

from . import _psycopg

TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
    asyncpg.TargetServerAttributeNotMatched,  # a standby, maybe about to be promoted
)
"""Worth retrying a connection attempt: the server is not there yet, restarting, or the
network is flaky."""

_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    *TRANSIENT,
    asyncpg.InterfaceError,  # the connection was closed under us
    asyncpg.PostgresConnectionError,
    asyncpg.OperatorInterventionError,  # 57xxx: terminated backend, shutdown, restart
    *_psycopg.CONNECTION_LOST,
)

INSUFFICIENT_PRIVILEGE = "42501"


def connection_lost(exc: BaseException) -> bool:
    """A failure of the database connection rather than of the user's code: logged without a
    traceback (a server restart is not a bug), but counted and retried like any failure."""
    if isinstance(exc, _CONNECTION_LOST):
        return True
    return _psycopg.socket_gone(exc)


def timed_out(exc: BaseException) -> bool:
    """A time limit ran out (``iteration_timeout``, a driver's statement or connect timeout):
    classed with the connection losses above (no traceback, retried), but named a timeout."""
    return isinstance(exc, TimeoutError)


def server_error(exc: BaseException) -> bool:
    """The server answered with an error: the connection itself is fine (unlike a timeout or a
    broken socket, after which its state is unknown)."""
    if isinstance(exc, asyncpg.PostgresError):
        return True
    return isinstance(exc, _psycopg.ERRORS) and getattr(exc, "sqlstate", None) is not None


def insufficient_privilege(exc: BaseException) -> bool:
    """The role may not do this (e.g. terminate another role's backends)."""
    return sqlstate(exc) == INSUFFICIENT_PRIVILEGE


def sqlstate(exc: BaseException) -> str | None:
    """The server's SQLSTATE for an error it answered with (either driver); None for a failure
    of the connection itself."""
    return getattr(exc, "sqlstate", None)
