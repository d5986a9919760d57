"""FastAPI and Starlette: a batchloop Host for the app's lifetime, and a request's transaction
(extra ``fastapi``).

A complete app (``app.py``; ``batchloop migrate``, create the table ``events (id bigserial
PRIMARY KEY, value int)``, then ``BATCHLOOP_DSN=... uvicorn app:app``)::

    import os
    from typing import Any

    from fastapi import FastAPI

    import batchloop as bl
    import batchloop.fastapi as blf


    @bl.work_query
    async def next_events(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
        rows = await conn.fetch("SELECT id FROM events ORDER BY id LIMIT 100")
        return bl.Work([r["id"] for r in rows]) if rows else bl.Idle()


    @bl.worker
    async def handle_events(conn: Any, batch: list[int]) -> None:
        await conn.execute("DELETE FROM events WHERE id = ANY($1)", batch)


    app = FastAPI(lifespan=blf.lifespan(os.environ["BATCHLOOP_DSN"], modules=[__name__]))


    @app.post("/events")
    async def create_event(conn: blf.Transaction, value: int) -> dict[str, int]:
        event_id = await conn.fetchval(
            "INSERT INTO events (value) VALUES ($1) RETURNING id", value
        )
        await bl.ping(conn, "events", next_events, handle_events)
        return {"id": event_id}  # committed, with the ping, before the response is sent

The Host runs in every process that serves the app (each uvicorn worker, each replica): they
share the loops, one per name cluster-wide, and take over each other's names when one stops or
dies. The lifespan does not migrate: run ``batchloop migrate`` when you deploy. A larger app,
with SIGTERM handling and a health endpoint, is ``examples/fastapi_app.py``; the guide is
docs/integrations.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends
from starlette.requests import HTTPConnection

from .errors import BatchloopError
from .runtime.host import Host

__all__ = ["Lifespan", "Transaction", "host", "lifespan", "transaction"]

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
"""What Starlette and FastAPI take as ``lifespan=``: called with the app, entered for its life."""


def lifespan(
    dsn: str | None = None,
    modules: Iterable[str] = (),
    *,
    inner: Lifespan | None = None,
    **host_kwargs: Any,
) -> Lifespan:
    """A lifespan that runs a :class:`batchloop.Host` while the app runs, as
    ``app.state.batchloop``.

    ``dsn``, ``modules`` and ``host_kwargs`` go to :class:`batchloop.Host` (checked now, so a
    bad argument fails when the app is built, not at its first start). ``inner``: the app's own
    lifespan, entered once the host runs (so it may use ``app.state.batchloop.pool``) and
    exited before the host stops; what it yields (Starlette's lifespan state) is passed on.
    On shutdown the host lets in-flight batches finish (``shutdown_grace``) and hands its
    names to the other hosts. It does not migrate.

    Starlette works the same way::

        from starlette.applications import Starlette
        import batchloop.fastapi as blf

        app = Starlette(lifespan=blf.lifespan(None, modules=["myapp.jobs"]))

    To run the app's own setup before the host starts instead, enter this one inside yours::

        @contextlib.asynccontextmanager
        async def app_lifespan(app):
            await create_tables()
            async with blf.lifespan(dsn, modules=["myapp.jobs"])(app):
                yield
    """
    modules = tuple(modules)
    Host(dsn, modules=modules, **host_kwargs)  # validation only: a Host does no I/O until entered

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[Any]:
        async with Host(dsn, modules=modules, **host_kwargs) as started:
            app.state.batchloop = started
            try:
                if inner is None:
                    yield None
                else:
                    async with inner(app) as state:
                        yield state
            finally:
                app.state.batchloop = None

    return run


def host(conn: HTTPConnection) -> Host:
    """The Host that :func:`lifespan` runs for the app serving this request (or websocket)."""
    found = getattr(conn.app.state, "batchloop", None)
    if not isinstance(found, Host):
        raise BatchloopError(
            "no batchloop Host on this app: build it with "
            "FastAPI(lifespan=batchloop.fastapi.lifespan(...)), and serve it with lifespan on"
        )
    return found


async def transaction(request: HTTPConnection) -> AsyncIterator[Any]:
    """A FastAPI dependency: a connection from the host's pool inside a transaction, which
    commits when the endpoint returns and rolls back when it raises (HTTPException included).

    The connection is an asyncpg ``Connection``, or a psycopg ``AsyncConnection`` with
    ``lifespan(..., driver="psycopg")``. Use it as :data:`Transaction` so the transaction ends
    before the response is sent: a client that gets a success knows its write (and its ping)
    committed, and a failed commit becomes an error response. With a plain
    ``Depends(transaction)`` FastAPI ends it after the response is sent.
    """
    running = host(request)
    if running.driver == "psycopg":
        async with running.pool.connection() as conn, conn.transaction():
            yield conn
    else:
        async with running.pool.acquire() as conn, conn.transaction():
            yield conn


Transaction = Annotated[Any, Depends(transaction, scope="function")]
"""An endpoint parameter ``conn: Transaction``: see :func:`transaction`."""
