"""batchloop.sync against a real PostgreSQL: the same calls as the async API, for scripts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anyio
import psycopg
import pytest

import batchloop as bl
import batchloop.sync as bls
from batchloop.migrations import code_version

from helpers import wait_for
from jobs import TABLES, next_items, process_items, undecorated


@pytest.fixture
def conn(migrated_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A plain (non-autocommit) psycopg connection on a migrated database with the test tables."""
    with psycopg.connect(migrated_dsn) as c:
        c.execute(TABLES)
        c.commit()
        yield c


def _insert(conn: psycopg.Connection[Any], name: str, count: int = 1) -> None:
    conn.execute(
        "INSERT INTO items (name, value) SELECT %s, g FROM generate_series(1, %s) g",
        (name, count),
    )


def _tables(dsn: str, schema: str = "batchloop") -> set[str]:
    with psycopg.connect(dsn, autocommit=True) as c:
        rows = c.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
        ).fetchall()
    return {r[0] for r in rows}


# ------------------------------------------------------------------------------ migrate


def test_migrate_with_dsn_is_idempotent(dsn: str) -> None:
    assert bls.migrate(dsn) == list(range(1, code_version() + 1))
    assert {"workers", "worker_state", "schema_migrations"} <= _tables(dsn)
    assert bls.migrate(dsn) == []
    assert bls.migrate(dsn) == []


def test_migrate_with_connection_commits_its_own_transaction(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        assert bls.migrate(c) == list(range(1, code_version() + 1))
        assert not c.info.transaction_status  # IDLE: nothing left open for the caller
        # Seen from another connection: it is committed.
        assert "workers" in _tables(dsn)
        assert bls.migrate(c) == []


def test_migrate_inside_callers_transaction_is_theirs_to_commit(dsn: str) -> None:
    with psycopg.connect(dsn) as c:
        c.execute("SELECT 1")  # opens the implicit transaction
        assert bls.migrate(c) == list(range(1, code_version() + 1))
        assert c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        c.rollback()
        assert "workers" not in _tables(dsn)


def test_migrate_other_schema_and_concurrently(dsn: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: bls.migrate(dsn, schema="jobs_q"), range(4)))
    assert sorted(results, key=len) == [[], [], [], list(range(1, code_version() + 1))]
    assert "workers" in _tables(dsn, "jobs_q")
    assert "workers" not in _tables(dsn)
    with pytest.raises(ValueError, match="invalid schema"):
        bls.migrate(dsn, schema="bad-name")


def test_async_api_accepts_a_sync_migration(dsn: str) -> None:
    bls.migrate(dsn)

    async def read() -> list[bl.WorkerStatus]:
        import asyncpg

        c = await asyncpg.connect(dsn)
        try:
            return await bl.list_workers(c)
        finally:
            await c.close()

    assert asyncio.run(read()) == []


# ------------------------------------------------------------------------------ ping


def test_ping_creates_worker_in_callers_transaction(conn: psycopg.Connection[Any]) -> None:
    with conn.transaction():
        _insert(conn, "alpha", 3)
        assert bls.ping(conn, "alpha", next_items, process_items) == "created"
    st = bls.status(conn, "alpha")
    assert st is not None
    assert st.name == "alpha"
    assert st.state == "running"
    assert st.work_query == "jobs:next_items"
    assert st.worker == "jobs:process_items"
    assert st.config == bl.Config()
    assert st.owner is None  # no host runs it
    assert st.batches == 0 and st.consecutive_failures == 0 and st.last_error is None
    assert isinstance(st.generation, int)
    conn.commit()


def test_ping_never_commits_for_the_caller(conn: psycopg.Connection[Any]) -> None:
    _insert(conn, "beta")
    assert bls.ping(conn, "beta", next_items, process_items) == "created"
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    conn.rollback()
    assert bls.status(conn, "beta") is None
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)


def test_ping_stores_new_config_and_keeps_it(conn: psycopg.Connection[Any]) -> None:
    assert bls.ping(conn, "gamma", next_items, process_items) == "created"
    assert bls.ping(conn, "gamma", next_items, process_items) == "unchanged"
    cfg = bl.Config(debounce=0.5, monitor_lag=5.0)
    assert bls.ping(conn, "gamma", next_items, process_items, config=cfg) == "updated"
    assert bls.ping(conn, "gamma", next_items, process_items) == "unchanged"
    conn.commit()
    st = bls.status(conn, "gamma")
    assert st is not None and st.config == cfg


def test_ping_unregistered_raises_and_creates_nothing(conn: psycopg.Connection[Any]) -> None:
    async def closure_query(c: Any, name: str) -> bl.Idle:
        return bl.Idle()

    bad: list[tuple[Any, Any]] = [
        (undecorated, process_items),
        (next_items, undecorated),
        (closure_query, process_items),
        (lambda c, n: None, process_items),
        (process_items, next_items),  # registered, but as the other kind
    ]
    for query, work in bad:
        with pytest.raises(bl.NotRegisteredError):
            bls.ping(conn, "delta", query, work)
    # Nothing ran: the transaction is still usable (no aborted statement) and empty.
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert bls.status(conn, "delta") is None
    assert bls.list_workers(conn) == []


@pytest.mark.parametrize("name", ["", "x" * 201, None, 7])
def test_ping_bad_name_raises_before_sql(conn: psycopg.Connection[Any], name: Any) -> None:
    with pytest.raises(ValueError):
        bls.ping(conn, name, next_items, process_items)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_ping_refuses_other_connection_types(migrated_dsn: str) -> None:
    async def attempt() -> None:
        async with await psycopg.AsyncConnection.connect(migrated_dsn) as ac:
            bls.ping(ac, "eps", next_items, process_items)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match="sync"):
        asyncio.run(attempt())


# ------------------------------------------------------------------------------ status & list


def test_status_and_list_workers(conn: psycopg.Connection[Any]) -> None:
    assert bls.list_workers(conn) == []
    assert bls.status(conn, "nobody") is None
    for name in ["b", "c", "a"]:
        bls.ping(conn, name, next_items, process_items)
    conn.commit()
    workers = bls.list_workers(conn)
    assert [w.name for w in workers] == ["a", "b", "c"]
    assert all(isinstance(w, bl.WorkerStatus) for w in workers)
    assert bls.status(conn, "b") == workers[1]


def test_autocommit_connection_works_too(migrated_dsn: str) -> None:
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        assert bls.ping(c, "auto", next_items, process_items) == "created"
    with psycopg.connect(migrated_dsn, autocommit=True) as c:
        st = bls.status(c, "auto")
        assert st is not None and st.state == "running"


# ------------------------------------------------------------------------------ stop / start


def test_stop_start_round_trip(conn: psycopg.Connection[Any]) -> None:
    assert bls.stop(conn, "nope") is False
    assert bls.start(conn, "nope") is False
    bls.ping(conn, "s", next_items, process_items)
    conn.commit()
    gen = bls.status(conn, "s").generation  # type: ignore[union-attr]

    assert bls.stop(conn, "s") is True
    conn.commit()
    st = bls.status(conn, "s")
    assert st is not None and st.state == "stopped" and st.generation > gen
    assert bls.stop(conn, "s") is True  # idempotent
    conn.commit()
    assert bls.status(conn, "s").state == "stopped"  # type: ignore[union-attr]

    # Pings are ignored while stopped.
    _insert(conn, "s")
    assert bls.ping(conn, "s", next_items, process_items) == "stopped"
    conn.commit()
    assert bls.status(conn, "s").state == "stopped"  # type: ignore[union-attr]

    assert bls.start(conn, "s") is True
    conn.commit()
    st = bls.status(conn, "s")
    assert st is not None and st.state == "running"
    assert bls.start(conn, "s") is True  # a no-op on a running worker
    conn.commit()
    assert bls.status(conn, "s").state == "running"  # type: ignore[union-attr]


def test_stop_takes_effect_only_when_the_caller_commits(conn: psycopg.Connection[Any]) -> None:
    bls.ping(conn, "t", next_items, process_items)
    conn.commit()
    assert bls.stop(conn, "t") is True
    conn.rollback()
    assert bls.status(conn, "t").state == "running"  # type: ignore[union-attr]


# ------------------------------------------------------------------------------ no schema


def test_unmigrated_database_gives_schema_missing(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(bl.SchemaMissingError, match="batchloop migrate"):
            bls.status(c, "x")
        with pytest.raises(bl.SchemaMissingError):
            bls.list_workers(c)
        with pytest.raises(bl.SchemaMissingError):
            bls.ping(c, "x", next_items, process_items)
        with pytest.raises(bl.SchemaMissingError):
            bls.stop(c, "x")
        with pytest.raises(bl.SchemaMissingError):
            bls.start(c, "x")
    # A migration in another schema does not count.
    bls.migrate(dsn, schema="elsewhere")
    with psycopg.connect(dsn, autocommit=True) as c:
        with pytest.raises(bl.SchemaMissingError):
            bls.list_workers(c)
        assert bls.list_workers(c, schema="elsewhere") == []


def test_unreachable_database_gives_connect_error() -> None:
    with pytest.raises(bl.BatchloopError, match="cannot connect"):
        bls.migrate("postgresql://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(bl.BatchloopError) as info:
        bls.connect("postgresql://nobody:secret@127.0.0.1:1/none")
    assert "secret" not in str(info.value)


# ------------------------------------------------------------------------------ with a host


@pytest.mark.anyio
async def test_sync_ping_wakes_a_running_host(migrated_dsn: str) -> None:
    """A script's ping (in a thread: psycopg sync blocks) is picked up by an async host."""

    def setup() -> None:
        with psycopg.connect(migrated_dsn) as c:
            c.execute(TABLES)

    def enqueue(count: int) -> str:
        with psycopg.connect(migrated_dsn) as c, c.transaction():
            _insert(c, "hosted", count)
            return bls.ping(c, "hosted", next_items, process_items)

    def remaining() -> int:
        with psycopg.connect(migrated_dsn, autocommit=True) as c:
            row = c.execute("SELECT count(*) FROM items").fetchone()
        return int(row[0]) if row else -1

    def state() -> str | None:
        with psycopg.connect(migrated_dsn, autocommit=True) as c:
            st = bls.status(c, "hosted")
        return st.state if st else None

    async def left() -> int:
        return await anyio.to_thread.run_sync(remaining)

    async def current() -> str | None:
        return await anyio.to_thread.run_sync(state)

    await anyio.to_thread.run_sync(setup)
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        assert await anyio.to_thread.run_sync(enqueue, 5) == "created"
        await wait_for(left, expect=0)
        await wait_for(current, expect="idle")
        # Idle now: the next sync ping wakes it.
        assert await anyio.to_thread.run_sync(enqueue, 3) == "woken"
        await wait_for(left, expect=0)
