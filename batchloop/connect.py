"""Opening asyncpg connections and pools with clear errors and bounded retries."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_before_delay,
    stop_never,
    wait_exponential,
    wait_random,
)

from . import sql
from .drivers.errors import TRANSIENT
from .dsn import for_asyncpg, parse, scrub
from .dsn import redact as redact
from .errors import BatchloopError, SessionRequiredError

if TYPE_CHECKING:
    from .drivers.psycopg import PsycopgPool

log = logging.getLogger("batchloop")


class ConnectError(BatchloopError):
    """The database could not be reached with the given DSN."""


KEEPALIVE = {"idle": 10, "interval": 5, "count": 3}
"""TCP keepalive on both ends: a silently dead peer is noticed in about 25 s (10 + 3 x 5)."""

SERVER_KEEPALIVE = sql.session_script(
    "server_keepalive", KEEPALIVE["idle"], KEEPALIVE["interval"], KEEPALIVE["count"]
)


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


async def server_keepalive(conn: asyncpg.Connection) -> None:
    """Let the server, too, drop a client that vanished."""
    await conn.execute(SERVER_KEEPALIVE)


SERVER_ID = "SELECT extract(epoch FROM pg_postmaster_start_time())::text"
"""Which server (and which run of it) a backend pid belongs to: after a failover the same pid
on the new primary is someone else's backend. A promoted standby shares the old primary's
system identifier, but not its postmaster's start time; the epoch form does not depend on the
session's TimeZone or DateStyle."""

_servers: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def remember_server(conn: Any, server: str | None) -> None:
    if server is not None:
        _servers[getattr(conn, "_con", None) or conn] = server


def server_id(conn: Any) -> str | None:
    """The SERVER_ID a pool connection (asyncpg or psycopg) reported when it was opened."""
    try:
        return _servers.get(getattr(conn, "_con", None) or conn)
    except TypeError:
        return None


async def _init(conn: asyncpg.Connection) -> None:
    keepalive(conn)
    await server_keepalive(conn)
    remember_server(conn, await conn.fetchval(SERVER_ID))


_ALREADY_RESET: weakref.WeakSet[Any] = weakref.WeakSet()
"""Connections whose reset went with their last COMMIT (:class:`ResetWithCommit`)."""


@dataclass(frozen=True, slots=True)
class ResetWithCommit:
    """A pool's reset-on-release, sent instead with the COMMIT of a loop's last iteration
    before the loop gives the connection back (it will sleep): the release then skips it.

    A cooling loop polls through the pool, and the reset was one round trip of the four each
    poll cost (and two of a name's statements). It is the same text the pool would send, run
    just before COMMIT in the same message (RESET ALL leaves the transaction's own settings
    alone); a transaction that does not commit leaves the connection unmarked, so the pool
    resets it as always."""

    text: Callable[[Any], str]
    """The reset statements for a connection the loop holds (a pool proxy for asyncpg)."""

    def done(self, conn: Any) -> None:
        """``conn`` (the pool's own connection object) was reset with its COMMIT."""
        _ALREADY_RESET.add(conn)

    def undone(self, conn: Any) -> None:
        """``conn`` is used again before going back: its release must reset it."""
        _ALREADY_RESET.discard(conn)


def _already_reset(conn: Any) -> bool:
    if conn in _ALREADY_RESET:
        _ALREADY_RESET.discard(conn)
        return True
    return False


def _asyncpg_reset_text(conn: Any) -> str:
    return f"{conn.get_reset_query()} {SERVER_KEEPALIVE}"


ASYNCPG_RESET = ResetWithCommit(_asyncpg_reset_text)


async def _reset(conn: asyncpg.Connection) -> None:
    """asyncpg's reset on release (RESET ALL and friends), keeping our keepalive settings:
    still one round trip (none when it went with the loop's COMMIT)."""
    if not _already_reset(conn):
        await conn.execute(_asyncpg_reset_text(conn))


def _clear(exc: BaseException, dsn: str | None) -> ConnectError:
    # scrub: a driver's message could echo a DSN value (asyncpg quotes bad URL parts).
    return ConnectError(scrub(f"cannot connect to PostgreSQL at {redact(dsn)}: {exc}", dsn))


def retrying(
    timeout: float | None, what: str = "PostgreSQL", *, max_wait: float = 4.0
) -> AsyncRetrying:
    """Retry transient connection failures with jittered exponential backoff, at most
    ``max_wait`` (plus up to a quarter of it, at least 0.25 s, of jitter) apart, giving up
    before ``timeout`` would be overrun (None: never)."""

    def say(state: RetryCallState) -> None:
        # An `after` hook: it runs for every failed attempt, the last one too, so even a
        # startup_timeout too short for a single retry leaves a line in the log.
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning("cannot reach %s (attempt %d): %s", what, state.attempt_number, exc)

    return AsyncRetrying(
        retry=retry_if_exception_type(TRANSIENT),
        wait=wait_exponential(multiplier=min(0.2, max_wait / 4), max=max_wait)
        + wait_random(0, max(0.25, max_wait / 4)),
        stop=stop_before_delay(timeout) if timeout is not None else stop_never,
        after=say,
        reraise=True,
    )


HOST_CONNECT_TIMEOUT = 5.0
"""How long one host of a multi-host DSN gets to answer, unless the DSN's ``connect_timeout``
or ``connect_kwargs["timeout"]`` says otherwise: a frozen primary accepts TCP connections (the
kernel does) but never answers, and must not use up the time the next host needs."""

_last_good: dict[str, tuple[str, int]] = {}
"""The host of each multi-host DSN that answered last: tried first next time, so that once the
standby is promoted, every new connection does not first wait out the frozen old primary."""


def hosts_of(params: dict[str, str]) -> list[tuple[str, int]] | None:
    """The (host, port) list of a multi-host DSN's libpq parameters; None for a single host
    (or a host list asyncpg should judge itself)."""
    hosts = (params.get("hostaddr") or params.get("host") or "").split(",")
    if len(hosts) < 2:
        return None
    ports = params.get("port", "").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts) or not all(p.strip().isdigit() or not p.strip() for p in ports):
        return None  # asyncpg's own error says what is wrong
    default = os.environ.get("PGPORT", "5432")
    return [(h, int(p.strip() or default)) for h, p in zip(hosts, ports, strict=True)]


async def connect_once(dsn: str | None, **kwargs: Any) -> asyncpg.Connection:
    """``asyncpg.connect``, but each host of a multi-host DSN gets its own attempt and timeout
    (asyncpg spends its one timeout on the first host and ignores ``connect_timeout``), and a
    multi-host DSN defaults to ``target_session_attrs=read-write``: a host writes."""
    url, options = for_asyncpg(dsn)
    params = parse(dsn) if dsn and dsn.strip() else {}
    targets = hosts_of(params)
    if targets is None:
        return await asyncpg.connect(url, **{**options, **kwargs})
    key = dsn or ""
    if key in _last_good and _last_good[key] in targets:
        targets.remove(_last_good[key])
        targets.insert(0, _last_good[key])
    per_host = float(kwargs.pop("timeout", None) or options.get("timeout") or 0)
    per_host = per_host if per_host > 0 else HOST_CONNECT_TIMEOUT
    if "target_session_attrs" not in params and "PGTARGETSESSIONATTRS" not in os.environ:
        kwargs.setdefault("target_session_attrs", "read-write")
    failures: list[str] = []
    for host, port in targets:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(
                url, host=host, port=port, timeout=per_host, **kwargs
            )
        except TRANSIENT as exc:
            failures.append(f"{host}:{port}: {type(exc).__name__}: {exc}".rstrip(": "))
            continue
        _last_good[key] = (host, port)
        return conn
    raise ConnectionError("no host would do: " + "; ".join(failures))


def server_of(conn: asyncpg.Connection) -> str:
    """Which server a connection reached, for the log (host:port as connected)."""
    addr = getattr(conn, "_addr", None)  # asyncpg's own, for the log only
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr) if addr else "the server"


async def connect(
    dsn: str | None, *, timeout: float | None, max_wait: float = 4.0, **kwargs: Any
) -> asyncpg.Connection:
    """One connection; retries transient failures until ``timeout`` (None: for ever), at most
    ``max_wait`` (plus jitter) apart."""
    for_asyncpg(dsn)  # a DsnError (ValueError) at once: retrying cannot help
    try:
        async for attempt in retrying(timeout, redact(dsn), max_wait=max_wait):
            with attempt:
                conn = await connect_once(dsn, **kwargs)
                keepalive(conn)
                if attempt.retry_state.attempt_number > 1:
                    log.warning(
                        "reached %s again at %s (attempt %d)",
                        redact(dsn),
                        server_of(conn),
                        attempt.retry_state.attempt_number,
                    )
                return conn
    except (asyncpg.PostgresError, ValueError, *TRANSIENT) as exc:  # type: ignore[misc]
        raise _clear(exc, dsn) from exc
    raise AssertionError("unreachable")  # pragma: no cover


RELEASE_TIMEOUT = 2.0
"""How long returning a connection to the pool may take. asyncpg first waits for any cancel
request it sent (a cancelled statement) and that wait is unbounded without a command_timeout:
to a frozen server it would never end, and neither would the loop or the host's session."""

CLOSE_TIMEOUT = 5.0


class AsyncpgPool:
    """An asyncpg pool lending connections the way the loop asks for them, with a bounded
    release (a connection that does not come back in time is terminated, not waited for)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        import anyio  # here: at the top, ruff would take every `timeout` parameter for anyio's

        conn = await self.pool.acquire()
        try:
            yield conn
        finally:
            with anyio.CancelScope(shield=True):
                try:
                    await self.pool.release(conn, timeout=RELEASE_TIMEOUT)
                except Exception as exc:
                    # asyncpg terminated it (a new one replaces it); the caller's error, if
                    # any, is the one worth reporting.
                    log.debug("a pool connection did not come back cleanly: %r", exc)

    async def close(self) -> None:
        import anyio

        with anyio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
            await self.pool.close()
        if scope.cancelled_caught:
            self.pool.terminate()


async def _pool_connect(dsn: str | None, **kwargs: Any) -> asyncpg.Connection:
    return await connect_once(dsn, **kwargs)


async def create_pool(
    dsn: str | None, *, timeout: float | None, min_size: int, max_size: int, **kwargs: Any
) -> asyncpg.Pool:
    url, options = for_asyncpg(dsn)
    try:
        async for attempt in retrying(timeout, redact(dsn)):
            with attempt:
                pool: asyncpg.Pool = await asyncpg.create_pool(  # type: ignore[call-overload]
                    url,
                    min_size=min_size,
                    max_size=max_size,
                    init=_init,
                    reset=_reset,
                    connect=_pool_connect,
                    **{**options, **kwargs},
                )
                return pool
    except (asyncpg.PostgresError, ValueError, *TRANSIENT) as exc:  # type: ignore[misc]
        raise _clear(exc, dsn) from exc
    raise AssertionError("unreachable")  # pragma: no cover


_RESET = f"{sql.session_script('reset_session')}; {SERVER_KEEPALIVE}"
PSYCOPG_RESET = ResetWithCommit(lambda conn: _RESET)


_LIBPQ_SAME = ("user", "password", "host", "port", "passfile")
_ASYNCPG_ONLY = ("statement_cache_size", "max_cached_statement_lifetime")
"""asyncpg options about its own statement cache: psycopg's pool is set up apart."""


def libpq_params(connect_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A Host's asyncpg ``connect_kwargs`` as libpq parameters for its psycopg pool, so both
    drivers connect the same way; ValueError for what has no libpq equivalent."""
    params: dict[str, Any] = {}
    for key, value in connect_kwargs.items():
        if key in _LIBPQ_SAME:
            params[key] = value
        elif key == "database":
            params["dbname"] = value
        elif key == "timeout":
            params["connect_timeout"] = max(1, round(value))
        elif key == "server_settings":
            settings = {k: v for k, v in value.items() if k != "application_name"}
            if settings:
                params["options"] = " ".join(
                    f"-c {k}={str(v).replace(chr(92), chr(92) * 2).replace(' ', chr(92) + ' ')}"
                    for k, v in settings.items()
                )
        elif key not in _ASYNCPG_ONLY:
            raise ValueError(
                f"connect_kwargs[{key!r}] has no psycopg equivalent; with driver='psycopg' "
                "put it in the DSN (e.g. sslmode=require) instead"
            )
    return params


async def create_psycopg_pool(
    dsn: str | None,
    *,
    timeout: float | None,
    min_size: int,
    max_size: int,
    application_name: str,
    prepare: bool = True,
    params: dict[str, Any] | None = None,
) -> PsycopgPool:
    """A psycopg_pool of autocommit connections (loops send their own BEGIN), opened with
    ``min_size`` connections within ``timeout`` (None: wait for ever)."""
    from .drivers._psycopg import require

    require('Host(driver="psycopg")', pool=True)
    import psycopg
    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    from .drivers.psycopg import PsycopgPool

    parse(dsn or "")  # a DsnError naming no DSN value, rather than libpq's quoting one

    async def configure(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(SERVER_KEEPALIVE.encode())
        row = await (await conn.execute(SERVER_ID.encode())).fetchone()
        remember_server(conn, str(row[0]) if row else None)

    async def reset(conn: psycopg.AsyncConnection[Any]) -> None:
        if not _already_reset(conn):
            await conn.execute(_RESET.encode())

    pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = AsyncConnectionPool(
        dsn or "",
        min_size=min_size,
        max_size=max_size,
        open=False,
        configure=configure,
        reset=reset,
        # After a failover the pool's idle connections are all dead: check each before lending
        # it (one round trip), or every loop gets a closed one and fails an iteration on it.
        check=AsyncConnectionPool.check_connection,
        name=application_name,
        kwargs={
            **(params or {}),
            "autocommit": True,
            "application_name": application_name,
            "prepare_threshold": 5 if prepare else None,
            "keepalives": 1,
            "keepalives_idle": KEEPALIVE["idle"],
            "keepalives_interval": KEEPALIVE["interval"],
            "keepalives_count": KEEPALIVE["count"],
        },
    )
    try:
        # Opening with min_size 0 proves nothing: borrow one connection to check the DSN.
        await pool.open(wait=True, timeout=timeout if timeout is not None else 1e9)
        async with pool.connection(timeout=timeout if timeout is not None else 1e9):
            pass
    except (PoolTimeout, psycopg.Error) as exc:
        await pool.close()
        raise _clear(exc, dsn) from exc
    return PsycopgPool(pool)


SESSION_HELP = (
    "batchloop's control connection needs a database session of its own (it holds session "
    "advisory locks and LISTENs for wake-ups), but {where} is served by a transaction- or "
    "statement-pooling proxy such as PgBouncer with pool_mode=transaction ({evidence}). "
    "Connect hosts to PostgreSQL directly or through a session-mode pool, or keep the pool on "
    "the proxy and give the control connection a direct DSN: Host(dsn, control_dsn=...)."
)


async def check_dedicated_session(
    conn: asyncpg.Connection, dsn: str | None, *, probes: int = 3, **connect_kwargs: Any
) -> None:
    """Raise SessionRequiredError unless ``conn`` is one server session that nobody else uses.

    On a direct connection this costs one query: PostgreSQL's startup message (BackendKeyData)
    carries the backend's pid, so it equals ``pg_backend_pid()``. A pooler cannot forward a
    real key when a client may be served by several backends, so PgBouncer (in any pool mode)
    sends a key of its own and the two differ. Then, to tell session pooling (fine: the
    server connection stays ours) from transaction or statement pooling, a probe connection
    to the same DSN holds a transaction open while ``conn`` asks for its backend again: a
    transaction pooler gives the probe our just-released backend (PgBouncer reuses the most
    recently used server first) or gives us another one; a session pooler does neither.
    Statement pooling refuses the probe's transaction outright. The probe is repeated so that
    a busy pool (another client grabbing our backend first) cannot hide the pooling.
    """
    try:
        pid = await conn.fetchval("SELECT pg_backend_pid()")
        if conn.get_server_pid() == pid:
            return
        url, options = for_asyncpg(dsn)
        for _ in range(probes):
            probe = await asyncpg.connect(url, **{**options, **connect_kwargs})
            try:
                async with probe.transaction():
                    probe_pid = await probe.fetchval("SELECT pg_backend_pid()")
                    again = await conn.fetchval("SELECT pg_backend_pid()")
            finally:
                await probe.close()
            if probe_pid == pid or again != pid:
                raise SessionRequiredError(
                    SESSION_HELP.format(
                        where=redact(dsn),
                        evidence=f"backend {pid} served another client while ours moved to "
                        f"backend {again}",
                    )
                )
    except (
        asyncpg.InvalidSQLStatementNameError,  # our cached statement is on another backend
        asyncpg.DuplicatePreparedStatementError,  # another client's statement is on ours
        asyncpg.ProtocolViolationError,  # statement pooling: "transaction blocks not allowed"
        asyncpg.ConnectionDoesNotExistError,  # ... after which PgBouncer closes the probe
    ) as exc:
        raise SessionRequiredError(
            SESSION_HELP.format(where=redact(dsn), evidence=f"{type(exc).__name__}: {exc}")
        ) from exc
