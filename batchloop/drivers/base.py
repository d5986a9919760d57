"""The driver seam: the interfaces every driver implements (a :class:`Session` for named
queries, a :class:`WorkConnection` for an iteration's transaction, a :class:`LoopDriver` for a
loop's connections), and the mapping of server errors to ours. The runtime composes these;
only the adapters beside this module name a client library."""

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


class WorkConnection(Protocol):
    """A pool connection as one iteration's transaction uses it: the I/O that
    :class:`batchloop.runtime.iteration.Iteration` composes. An adapter wraps one connection
    for one transaction; what to send, and when, is the runtime's."""

    @property
    def raw(self) -> Any:
        """The driver's own connection, handed to the user's callables."""
        ...

    @property
    def session(self) -> Session:
        """Named queries (with parameters) inside the transaction."""
        ...

    @property
    def sends_text(self) -> bool:
        """Whether BEGIN and COMMIT may go as text of ours, with other statements in the same
        message (asyncpg: only while its transaction object can be told about it)."""
        ...

    def server_session(self) -> object:
        """An object that lives exactly as long as the server session behind the connection
        (it keeps our prepared statements), weakly referenceable."""
        ...

    async def send(self, text: str) -> str:
        """Run parameterless statements in one simple-protocol message; the last one's tag."""
        ...

    async def execute(self, query: str, *args: Any) -> str:
        """Run the named query with parameters; its command tag."""
        ...

    async def begin(self) -> None:
        """BEGIN (READ COMMITTED) the driver's own way."""
        ...

    async def commit(self) -> str:
        """COMMIT the driver's own way; the command tag (``ROLLBACK`` if it was aborted)."""
        ...

    async def rollback(self) -> None:
        """Roll back the transaction if one is open, the driver's own way."""
        ...

    def began_as_text(self) -> None:
        """BEGIN went as our text: make it the driver's own transaction, so that
        ``conn.transaction()`` in a callable nests as a savepoint."""
        ...

    def ended_as_text(self) -> None:
        """The transaction ended by text the driver did not see (COMMIT or ROLLBACK)."""
        ...

    def in_transaction(self) -> bool:
        """Whether the transaction is still open (user code must not end it)."""
        ...

    def broken(self) -> bool:
        """Whether the connection is closed or lost, so rolling back on it is pointless."""
        ...

    def abandon(self) -> None:
        """Close the connection at once, without a word to a server that does not answer."""
        ...


class LoopDriver(Protocol):
    """What a loop needs of the client library whose connections run the user's callables."""

    def session(self, conn: Any, schema: str) -> Session: ...

    def work(self, conn: Any, schema: str) -> WorkConnection:
        """``conn`` ready for one iteration's transaction."""
        ...

    def pid(self, conn: Any) -> int:
        """The server process behind ``conn`` (to end it if this host loses its session)."""
        ...

    def broken(self, conn: Any) -> bool:
        """Whether ``conn`` is closed or lost, so rolling back on it is pointless."""
        ...

    def abandon(self, conn: Any) -> None:
        """Close ``conn`` at once, without a word to a server that does not answer."""
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
