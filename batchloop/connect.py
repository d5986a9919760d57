"""Opening asyncpg connections and pools with clear errors and bounded retries."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
from typing import Any

import asyncpg
from tenacity import (
    AsyncRetrying,
    before_sleep_log,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_exponential_jitter,
)

from .errors import BatchloopError

log = logging.getLogger("batchloop")

# Worth retrying: the server is not there yet, restarting, or the network is flaky.
TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.TooManyConnectionsError,
)


class ConnectError(BatchloopError):
    """The database could not be reached with the given DSN."""


KEEPALIVE = {"idle": 10, "interval": 5, "count": 3}
"""TCP keepalive on both ends: a silently dead peer is noticed in about 25 s (10 + 3 x 5)."""

SERVER_KEEPALIVE = {
    "tcp_keepalives_idle": str(KEEPALIVE["idle"]),
    "tcp_keepalives_interval": str(KEEPALIVE["interval"]),
    "tcp_keepalives_count": str(KEEPALIVE["count"]),
}


def keepalive(conn: asyncpg.Connection) -> None:
    """Let the client notice a half-open TCP connection (asyncpg has no option for it)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE["idle"])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE["interval"])
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE["count"])


async def _init(conn: asyncpg.Connection) -> None:
    keepalive(conn)


def redact(dsn: str | None) -> str:
    if not dsn:
        return "the default (PG* environment) server"
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def _clear(exc: BaseException, dsn: str | None) -> ConnectError:
    return ConnectError(f"cannot connect to PostgreSQL at {redact(dsn)}: {exc}")


def retrying(timeout: float | None) -> AsyncRetrying:
    """Retry transient connection failures with jittered exponential backoff, up to 5 s apart."""
    return AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
        stop=stop_after_delay(timeout) if timeout is not None else stop_never,
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )


async def connect(dsn: str | None, *, timeout: float | None, **kwargs: Any) -> asyncpg.Connection:
    """One connection; retries transient failures until ``timeout`` (None: for ever)."""
    try:
        async for attempt in retrying(timeout):
            with attempt:
                conn: asyncpg.Connection = await asyncpg.connect(dsn, **kwargs)
                keepalive(conn)
                return conn
    except (asyncpg.PostgresError, ValueError, *TRANSIENT) as exc:  # type: ignore[misc]
        raise _clear(exc, dsn) from exc
    raise AssertionError("unreachable")  # pragma: no cover


async def create_pool(
    dsn: str | None, *, timeout: float | None, min_size: int, max_size: int, **kwargs: Any
) -> asyncpg.Pool:
    try:
        async for attempt in retrying(timeout):
            with attempt:
                pool: asyncpg.Pool = await asyncpg.create_pool(
                    dsn, min_size=min_size, max_size=max_size, init=_init, **kwargs
                )
                return pool
    except (asyncpg.PostgresError, ValueError, *TRANSIENT) as exc:  # type: ignore[misc]
        raise _clear(exc, dsn) from exc
    raise AssertionError("unreachable")  # pragma: no cover
