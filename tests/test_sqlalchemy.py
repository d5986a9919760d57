"""batchloop's calls on SQLAlchemy connections and sessions, against a real PostgreSQL: they run
in the caller's current transaction (a rollback undoes a ping, a commit keeps it), on asyncpg and
psycopg underneath, async and sync."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

import batchloop as bl  # noqa: E402
import batchloop.sync as bls  # noqa: E402

from helpers import count, wait_for  # noqa: E402
from jobs import TABLES, next_items, process_items  # noqa: E402

pytestmark = pytest.mark.anyio

ASYNC_DRIVERS = ["asyncpg", "psycopg"]
INSERT = text("INSERT INTO items (name, value) VALUES (:name, 1)")


def _url(dsn: str, driver: str) -> str:
    assert dsn.startswith("postgresql://")
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture
async def tables(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection for looking from outside, on a database with the test tables."""
    conn = await asyncpg.connect(migrated_dsn)
    await conn.execute(TABLES)
    yield conn
    await conn.close()


@pytest.fixture(params=ASYNC_DRIVERS)
async def engine(request: pytest.FixtureRequest, migrated_dsn: str) -> AsyncIterator[AsyncEngine]:
    eng = create_async_engine(_url(migrated_dsn, request.param))
    yield eng
    await eng.dispose()


@pytest.fixture
def sync_engine(migrated_dsn: str) -> Iterator[Engine]:
    eng = create_engine(_url(migrated_dsn, "psycopg"))
    yield eng
    eng.dispose()


async def _outside(conn: asyncpg.Connection, name: str) -> tuple[int, bl.WorkerStatus | None]:
    """What another connection sees committed: the name's items, and its worker."""
    items = await count(conn, "SELECT count(*) FROM items WHERE name = $1", name)
    return items, await bl.status(conn, name)


async def _ping(conn: Any, name: str) -> str:
    return await bl.ping(conn, name, next_items, process_items)


# ------------------------------------------------------------------ async: commit and rollback


@pytest.mark.parametrize("first", ["ping", "insert"])
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_async_session_ping_is_in_the_sessions_transaction(
    engine: AsyncEngine, tables: asyncpg.Connection, outcome: str, first: str
) -> None:
    """``first="ping"``: nothing has run on the session yet, so neither SQLAlchemy nor (with
    asyncpg) the driver has begun a transaction: the ping must begin it, not autocommit."""
    async with AsyncSession(engine) as session:
        if first == "insert":
            await session.execute(INSERT, {"name": "s"})
        assert await _ping(session, "s") == "created"
        if first == "ping":
            await session.execute(INSERT, {"name": "s"})
        # Uncommitted: invisible from outside.
        assert await _outside(tables, "s") == (0, None)
        await (session.commit() if outcome == "commit" else session.rollback())
    items, st = await _outside(tables, "s")
    if outcome == "commit":
        assert items == 1 and st is not None and st.worker == "jobs:process_items"
    else:
        assert (items, st) == (0, None)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
async def test_async_connection_ping_is_in_the_connections_transaction(
    engine: AsyncEngine, tables: asyncpg.Connection, outcome: str
) -> None:
    async with engine.connect() as conn:
        assert await _ping(conn, "c") == "created"  # the first statement on the connection
        await conn.execute(INSERT, {"name": "c"})
        await (conn.commit() if outcome == "commit" else conn.rollback())
    items, st = await _outside(tables, "c")
    if outcome == "commit":
        assert items == 1 and st is not None and st.work_query == "jobs:next_items"
    else:
        assert (items, st) == (0, None)


async def test_async_session_begin_block_rolls_back_on_error(
    engine: AsyncEngine, tables: asyncpg.Connection
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with AsyncSession(engine) as session, session.begin():
            await _ping(session, "b")
            raise Boom
    assert await _outside(tables, "b") == (0, None)
    async with AsyncSession(engine) as session, session.begin():
        assert await _ping(session, "b") == "created"
    assert (await _outside(tables, "b"))[1] is not None


async def test_a_ping_in_a_rolled_back_savepoint_is_undone(
    engine: AsyncEngine, tables: asyncpg.Connection
) -> None:
    class Boom(Exception):
        pass

    async with AsyncSession(engine) as session, session.begin():
        await session.execute(INSERT, {"name": "kept"})
        with pytest.raises(Boom):
            async with session.begin_nested():
                await _ping(session, "nested")
                raise Boom
        await _ping(session, "kept")
    assert await _outside(tables, "nested") == (0, None)
    items, st = await _outside(tables, "kept")
    assert items == 1 and st is not None


async def test_async_control_calls_run_in_the_transaction(
    engine: AsyncEngine, tables: asyncpg.Connection
) -> None:
    async with engine.begin() as conn:
        await _ping(conn, "ctl")
    # stop, then roll back: still not stopped
    async with AsyncSession(engine) as session:
        assert await bl.stop(session, "ctl") is True
        st = await bl.status(session, "ctl")  # sees its own uncommitted stop
        assert st is not None and st.state == "stopped"
        await session.rollback()
    st = await bl.status(tables, "ctl")
    assert st is not None and st.state != "stopped"
    async with AsyncSession(engine) as session, session.begin():
        assert await bl.stop(session, "ctl") is True
    assert await _state(tables, "ctl") == "stopped"
    async with engine.connect() as conn:
        assert await bl.wake(conn, "ctl") is False  # stopped
        assert await bl.start(conn, "ctl") is True
        assert await bl.wake(conn, "ctl") is True
        assert [w.name for w in await bl.list_workers(conn)] == ["ctl"]
        assert await bl.list_hosts(conn) == []
        assert await bl.status(conn, "missing") is None
        await conn.commit()
    assert await _state(tables, "ctl") != "stopped"


async def _state(conn: Any, name: str) -> str | None:
    st = await bl.status(conn, name)
    return st.state if st else None


async def test_host_processes_work_pinged_through_sqlalchemy(
    engine: AsyncEngine, tables: asyncpg.Connection, migrated_dsn: str
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        async with AsyncSession(engine) as session, session.begin():
            for _ in range(5):
                await session.execute(INSERT, {"name": "h"})
            await _ping(session, "h")
        done = "SELECT count(*) FROM done WHERE name = 'h'"
        await wait_for(lambda: count(tables, done), expect=5)
        # A rolled-back insert and ping leave nothing for the host to do.
        async with AsyncSession(engine) as session:
            await session.execute(INSERT, {"name": "h2"})
            await _ping(session, "h2")
            await session.rollback()
        assert await _outside(tables, "h2") == (0, None)
    assert await count(tables, "SELECT count(*) FROM items") == 0


async def test_a_sync_sqlalchemy_connection_is_refused_by_the_async_api(
    sync_engine: Engine, tables: asyncpg.Connection
) -> None:
    with sync_engine.connect() as conn:
        with pytest.raises(TypeError, match=r"AsyncConnection or AsyncSession.*batchloop\.sync"):
            await _ping(conn, "x")
        with Session(sync_engine) as session, pytest.raises(TypeError, match="not supported"):
            await bl.status(session, "x")


# ------------------------------------------------------------------ sync (psycopg 3)


def _sync_outside(dsn: str, name: str) -> tuple[int, bl.WorkerStatus | None]:
    with bls.connect(dsn, autocommit=True) as c:
        row = c.execute("SELECT count(*) FROM items WHERE name = %s", (name,)).fetchone()
        assert row is not None
        return int(row[0]), bls.status(c, name)


@pytest.mark.parametrize("first", ["ping", "insert"])
@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_sync_session_ping_is_in_the_sessions_transaction(
    sync_engine: Engine, migrated_dsn: str, outcome: str, first: str
) -> None:
    with sync_engine.begin() as conn:
        conn.exec_driver_sql(TABLES)
    with Session(sync_engine) as session:
        if first == "insert":
            session.execute(INSERT, {"name": "s"})
        assert bls.ping(session, "s", next_items, process_items) == "created"
        if first == "ping":
            session.execute(INSERT, {"name": "s"})
        assert _sync_outside(migrated_dsn, "s") == (0, None)
        session.commit() if outcome == "commit" else session.rollback()
    items, st = _sync_outside(migrated_dsn, "s")
    if outcome == "commit":
        assert items == 1 and st is not None and st.worker == "jobs:process_items"
    else:
        assert (items, st) == (0, None)


@pytest.mark.parametrize("outcome", ["commit", "rollback"])
def test_sync_connection_calls_are_in_the_connections_transaction(
    sync_engine: Engine, migrated_dsn: str, outcome: str
) -> None:
    with sync_engine.begin() as conn:
        conn.exec_driver_sql(TABLES)
        bls.ping(conn, "c", next_items, process_items)
    with sync_engine.connect() as conn:
        assert bls.stop(conn, "c") is True
        st = bls.status(conn, "c")
        assert st is not None and st.state == "stopped"
        assert [w.name for w in bls.list_workers(conn)] == ["c"]
        assert bls.list_hosts(conn) == []
        conn.commit() if outcome == "commit" else conn.rollback()
    st = _sync_outside(migrated_dsn, "c")[1]
    assert st is not None and (st.state == "stopped") is (outcome == "commit")
    with sync_engine.begin() as conn:
        assert bls.start(conn, "c") is True  # True whenever the worker exists
        assert bls.wake(conn, "c") is True


def test_an_async_only_or_foreign_object_is_refused_by_sync(sync_engine: Engine) -> None:
    with pytest.raises(TypeError, match="Connection or Session on postgresql"):
        bls.status(text("SELECT 1"), "x")


def test_a_non_postgresql_dialect_is_refused_with_its_name() -> None:
    engine = create_engine("sqlite://")
    with engine.connect() as conn, pytest.raises(TypeError, match=r"got dialect sqlite\+pysqlite"):
        bls.status(conn, "x")
    engine.dispose()
