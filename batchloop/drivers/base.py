"""The interface every driver implements, and the mapping of server errors to ours."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from ..errors import SchemaMissingError, SchemaTooNewError

Row = Mapping[str, Any]

# SQLSTATEs meaning "the batchloop schema, or one of its objects, is not there".
_MISSING = {"3F000", "42883", "42P01"}
TOO_NEW = "BLNEW"


class Session(Protocol):
    """One database connection, as batchloop uses it: named queries and scripts."""

    schema: str

    @property
    def raw(self) -> Any:
        """The driver's own connection, handed to user callables."""
        ...

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]: ...

    async def fetchrow(self, name: str, *args: Any) -> Row | None: ...

    async def fetchval(self, name: str, *args: Any) -> Any: ...

    async def script(self, sql: str) -> None:
        """Run SQL text that may hold several statements and no parameters."""
        ...


class Iteration(Protocol):
    """One loop iteration's transaction on a connection that user callables share."""

    @property
    def session(self) -> Session:
        """Named queries inside the iteration's transaction."""
        ...

    async def begin(self, revision: int) -> bool:
        """Open the transaction (READ COMMITTED) and book a batch; False if the fence did
        not match (then the loop runs the full fence inside the same transaction)."""
        ...

    async def book(self, revision: int) -> bool:
        """Book a batch after the full fence sorted things out."""
        ...

    def open(self) -> bool:
        """Whether the transaction is still open (user code must not end it)."""
        ...

    async def commit(self, *, unbook: bool, debounce: float = 0.0) -> None:
        """Commit; ``unbook`` when no batch was processed, ``debounce`` to delay the next run."""
        ...

    async def rollback(self) -> None: ...


class LoopDriver(Protocol):
    """What a loop needs of the client library whose connections run the user's callables."""

    name: str

    def session(self, conn: Any, schema: str) -> Session: ...

    def iteration(
        self, conn: Any, schema: str, name: str, generation: int, stop_key: int, *, prepare: bool
    ) -> Iteration:
        """``prepare``: keep ``book_batch`` prepared in each server session (not through a
        transaction pooler, which moves a connection between server sessions)."""
        ...

    def pid(self, conn: Any) -> int:
        """The server process behind ``conn`` (to end it if this host loses its session)."""
        ...

    def broken(self, conn: Any) -> bool:
        """Whether ``conn`` is closed or lost, so rolling back on it is pointless."""
        ...


def translate(exc: BaseException, schema: str) -> BaseException | None:
    """Our error for a server error that means the schema is missing, outdated or too new."""
    state = getattr(exc, "sqlstate", None)
    if state == TOO_NEW:
        return SchemaTooNewError(_message(exc))
    if state in _MISSING:
        return SchemaMissingError(
            f"the batchloop schema {schema!r} is missing or outdated in this database "
            f"({_message(exc)}); run `batchloop migrate` (or `await batchloop.migrate(dsn)`)"
        )
    return None


def _message(exc: BaseException) -> str:
    """The server's primary message, without psycopg's LINE/caret context."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None) or getattr(exc, "message", None)
    return str(primary or exc).strip()


class ControlConnection(Protocol):
    """The host's control connection, as its session (runtime/session.py) uses it: raw SQL
    with a timeout, LISTEN, and notice of the connection's end. Implemented by
    :class:`batchloop.drivers.asyncpg_control.AsyncpgControl`."""

    @property
    def raw(self) -> Any:
        """The driver's own connection (``tick`` runs its iterations on it)."""
        ...

    def server_pid(self) -> int:
        """The backend's pid, as the server announced it at connection start."""
        ...

    def where(self) -> str:
        """Which server it reached (host:port), for the log."""
        ...

    def watch(self, on_lost: Callable[[], None]) -> None:
        """Call ``on_lost`` once the connection is closed or broken."""
        ...

    def unwatch(self) -> None:
        """Stop calling it (a borrowed connection outlives our use of it)."""
        ...

    async def fetch(self, sql: str, *args: Any, timeout: float) -> Sequence[Row]: ...

    async def execute(self, sql: str, *, timeout: float) -> None:
        """Run SQL text that may hold several statements and no parameters."""
        ...

    async def listen(self, channel: str, on_payload: Callable[[str], None]) -> None: ...

    async def check_dedicated(self) -> None:
        """Raise SessionRequiredError unless this is one server session nobody else uses."""
        ...

    async def keep_alive(self) -> None:
        """Let the server, too, drop this client if it vanishes."""
        ...

    def terminate(self) -> None:
        """Drop the connection now, without a goodbye to the server."""
        ...

    def is_closed(self) -> bool: ...

    async def close(self, *, timeout: float) -> None: ...


ControlConnector = Callable[[float | None, float], Awaitable[ControlConnection]]
"""Opens a control connection: ``(retry_for, max_wait)``, retrying transient failures for
``retry_for`` seconds (None: for ever), at most ``max_wait`` apart."""
