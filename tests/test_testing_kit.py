"""batchloop.testing: the pytest plugin's fixtures and marker, drain() and wait_idle(), on real
PostgreSQL; docs/testing.md's example run by a real pytest in a subprocess."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import asyncpg
import kit_jobs
import psycopg
import pytest

import batchloop as bl
from batchloop.errors import NotRegisteredError, TransactionAborted
from batchloop.testing import DrainRefused, UnknownWorkerError, databases, drain, wait_idle

pytestmark = pytest.mark.anyio

DOC = Path(__file__).resolve().parent.parent / "docs" / "testing.md"
DRIVERS = ["asyncpg", "psycopg"]


@pytest.fixture(autouse=True)
def _reset() -> None:
    kit_jobs.reset()


async def _connect(dsn: str, driver: str) -> Any:
    if driver == "psycopg":
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    return await asyncpg.connect(dsn)


class Db:
    """The same few statements on either driver (``$n`` parameters, rewritten for psycopg)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.psycopg = isinstance(conn, psycopg.AsyncConnection)

    async def execute(self, query: str, *args: Any) -> None:
        if self.psycopg and not args:
            await self.conn.execute(query)  # simple protocol: several statements allowed
        elif self.psycopg:
            await self.conn.execute(re.sub(r"\$\d+", "%s", query), args)
        else:
            await self.conn.execute(query, *args)

    async def value(self, query: str, *args: Any) -> Any:
        if self.psycopg:
            cur = await self.conn.execute(re.sub(r"\$\d+", "%s", query), args)
            return (await cur.fetchone())[0]
        return await self.conn.fetchval(query, *args)

    def transaction(self) -> Any:
        return self.conn.transaction()


@pytest.fixture(params=DRIVERS)
async def db(request: pytest.FixtureRequest, batchloop_dsn: str) -> AsyncIterator[Db]:
    conn = await _connect(batchloop_dsn, request.param)
    try:
        db = Db(conn)
        await db.execute(kit_jobs.SCHEMA)
        yield db
    finally:
        await conn.close()


class Rollback(Exception):
    """Raised to roll a test transaction back."""


async def _items(db: Db, queue: str, n: int) -> None:
    await db.execute(
        "INSERT INTO kit_items (queue) SELECT $1 FROM generate_series(1, $2::int)", queue, n
    )


# ------------------------------------------------------------------------------- the plugin


def test_plugin_is_loaded_through_its_entry_point(pytestconfig: pytest.Config) -> None:
    found = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert found.get("batchloop") == "batchloop.testing.plugin"
    plugin = pytestconfig.pluginmanager.get_plugin("batchloop")
    assert plugin is not None and plugin.__name__ == "batchloop.testing.plugin"


def test_marker_is_registered(pytestconfig: pytest.Config) -> None:
    lines = pytestconfig.getini("markers")
    assert any(str(line).startswith("batchloop_modules(") for line in lines), lines


async def test_batchloop_dsn_is_a_fresh_migrated_database(batchloop_dsn: str) -> None:
    assert databases.database_of(batchloop_dsn).startswith(databases.TEST_PREFIX)
    conn = await asyncpg.connect(batchloop_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM batchloop.schema_migrations") >= 1
        assert await bl.list_workers(conn) == []
        tables = await conn.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN "
            "('pg_catalog', 'information_schema', 'batchloop')"
        )
        assert tables == 0
    finally:
        await conn.close()
    # psycopg takes the same URL.
    async with await psycopg.AsyncConnection.connect(batchloop_dsn) as pconn:
        assert await bl.list_workers(pconn) == []


def test_supply_makes_copies_ahead_and_drops_them_all(
    pg_admin_dsn: str, batchloop_template: str
) -> None:
    prefix = f"bltest_supply_{os.getpid()}_"
    supply = databases.Supply(pg_admin_dsn, batchloop_template, prefix=prefix)
    taken: list[str] = []
    try:
        taken += [supply.take(), supply.take()]
        first, second = taken
        assert first != second
        assert _databases(pg_admin_dsn, prefix) >= 2  # and the next one, ahead, maybe already
        leaked = psycopg.connect(first)  # still open at the drop: WITH (FORCE) ends it
        with psycopg.connect(second) as conn:
            row = conn.execute("SELECT count(*) FROM batchloop.schema_migrations").fetchone()
            assert row is not None and row[0] >= 1  # a copy of the migrated template
    finally:
        for url in taken:
            supply.give_back(url)
        supply.close()  # waits for the drops
    assert _databases(pg_admin_dsn, prefix) == 0
    with pytest.raises(psycopg.OperationalError):
        leaked.execute("SELECT 1")
    leaked.close()


def _databases(admin_dsn: str, prefix: str) -> int:
    with databases.admin_connect(admin_dsn) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_database WHERE starts_with(datname, %s)", (prefix,)
        ).fetchone()
    assert row is not None
    return int(row[0])


# ----------------------------------------------------------------------------------- drain


async def test_drain_in_a_rolled_back_transaction_leaves_nothing(db: Db) -> None:
    with pytest.raises(Rollback):
        async with db.transaction():
            await _items(db, "q", 5)
            assert await bl.ping(db.conn, "q", kit_jobs.take, kit_jobs.move) == "created"
            assert await drain(db.conn, "q") == 3  # 2 + 2 + 1
            assert await db.value("SELECT count(*) FROM kit_items") == 0
            assert await db.value("SELECT count(*) FROM kit_done WHERE queue = 'q'") == 5
            assert await drain(db.conn, "q") == 0  # nothing left
            raise Rollback
    assert kit_jobs.OUTCOMES == [([1, 2], True), ([3, 4], True), ([5], True)]
    assert await db.value("SELECT count(*) FROM kit_done") == 0
    assert await db.value("SELECT count(*) FROM batchloop.workers") == 0
    # No host, and no lock of batchloop's left on the server.
    assert await db.value("SELECT count(*) FROM batchloop.hosts") == 0
    held = await db.value(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    assert held == 0


async def test_drain_on_a_psycopg_connection_in_its_implicit_transaction(
    batchloop_dsn: str,
) -> None:
    """psycopg without autocommit: the first statement began the caller's transaction, and
    drain's batches are savepoints in it, gone with the caller's rollback."""
    async with await psycopg.AsyncConnection.connect(batchloop_dsn) as conn:
        await conn.execute(kit_jobs.SCHEMA)
        await conn.commit()
        await conn.execute("INSERT INTO kit_items (queue) VALUES ('i'), ('i'), ('i')")
        await bl.ping(conn, "i", kit_jobs.take, kit_jobs.move)
        assert await drain(conn, "i") == 2
        cur = await conn.execute("SELECT count(*) FROM kit_done")
        assert await cur.fetchone() == (3,)
        await conn.rollback()
        cur = await conn.execute("SELECT count(*) FROM kit_done")
        assert await cur.fetchone() == (0,)
        assert await bl.status(conn, "i") is None


@pytest.mark.parametrize("driver", DRIVERS)
async def test_drain_in_a_sqlalchemy_session_that_rolls_back(
    batchloop_dsn: str, driver: str
) -> None:
    import sqlalchemy  # the dev extra has it (the sqlalchemy extra)
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    url = batchloop_dsn.replace("postgresql://", f"postgresql+{driver}://", 1)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as setup:
            for statement in kit_jobs.SCHEMA.split(";")[:-1]:
                await setup.execute(sqlalchemy.text(statement))
        async with AsyncSession(engine) as session:
            await session.execute(
                sqlalchemy.text("INSERT INTO kit_items (queue) VALUES ('sa'), ('sa'), ('sa')")
            )
            await bl.ping(session, "sa", kit_jobs.take, kit_jobs.move)
            assert await drain(session, "sa") == 2
            done = await session.execute(sqlalchemy.text("SELECT count(*) FROM kit_done"))
            assert done.scalar_one() == 3
            await session.rollback()
            done = await session.execute(sqlalchemy.text("SELECT count(*) FROM kit_done"))
            assert done.scalar_one() == 0
            assert await bl.status(session, "sa") is None
    finally:
        await engine.dispose()
    assert kit_jobs.OUTCOMES == [([1, 2], True), ([3], True)]


async def test_drain_outside_a_transaction_commits_each_batch(db: Db) -> None:
    await _items(db, "c", 3)
    await bl.ping(db.conn, "c", kit_jobs.take, kit_jobs.move)
    kit_jobs.DEBOUNCE.add("c")  # ignored by drain: it runs to the end now
    assert await drain(db.conn, "c") == 2
    assert await db.value("SELECT count(*) FROM kit_done WHERE queue = 'c'") == 3
    assert kit_jobs.OUTCOMES == [([1, 2], True), ([3], True)]
    # batchloop's own tables are only read: the name is as the ping left it.
    status = await bl.status(db.conn, "c")
    assert status is not None and status.state == "running" and status.batches == 0


async def test_a_failing_batch_rolls_back_its_savepoint_and_raises(db: Db) -> None:
    kit_jobs.FAIL_AT["f"] = 2
    async with db.transaction():
        await _items(db, "f", 5)
        await bl.ping(db.conn, "f", kit_jobs.take, kit_jobs.move)
        with pytest.raises(RuntimeError, match="injected failure in batch 2"):
            await drain(db.conn, "f")
        # The first batch stays, the second is undone, and the transaction is still usable.
        assert await db.value("SELECT count(*) FROM kit_done") == 2
        assert await db.value("SELECT count(*) FROM kit_items") == 3
    assert kit_jobs.OUTCOMES == [([1, 2], True), ([3, 4], False)]
    assert await db.value("SELECT count(*) FROM kit_done") == 2  # committed with the caller


async def test_a_swallowed_error_is_reported_not_committed(db: Db) -> None:
    kit_jobs.SWALLOW.add("s")
    async with db.transaction():
        await _items(db, "s", 1)
        await bl.ping(db.conn, "s", kit_jobs.take, kit_jobs.move)
        with pytest.raises(TransactionAborted, match="caught inside a callable"):
            await drain(db.conn, "s")
        assert await db.value("SELECT count(*) FROM kit_done") == 0
    assert kit_jobs.OUTCOMES == [([1], False)]


async def test_drain_applies_the_stored_iteration_timeout(db: Db) -> None:
    config = bl.Config(iteration_timeout=0.3)
    async with db.transaction():
        await _items(db, "slow", 1)
        await bl.ping(db.conn, "slow", kit_jobs.take, kit_jobs.sleepy, config=config)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"iteration_timeout \(0.3 s\) exceeded"):
            await drain(db.conn, "slow")
        assert time.monotonic() - started < 20  # cut off, not left to pg_sleep(30)
        # The batch's delete was undone with its savepoint; the transaction goes on.
        assert await db.value("SELECT count(*) FROM kit_items") == 1


async def test_drain_stops_at_max_batches(db: Db) -> None:
    async with db.transaction():
        await bl.ping(db.conn, "always", kit_jobs.always, kit_jobs.count)
        assert await drain(db.conn, "always", max_batches=3) == 3
    assert kit_jobs.CALLS["always"] == 3


async def test_drain_refuses_an_unknown_name(db: Db) -> None:
    with pytest.raises(UnknownWorkerError, match=r"no worker named 'nope' in schema 'batchloop'"):
        await drain(db.conn, "nope")
    with pytest.raises(ValueError, match="1 to 200 characters"):
        await drain(db.conn, "")
    with pytest.raises(ValueError, match="max_batches"):
        await drain(db.conn, "nope", max_batches=0)


async def test_drain_runs_only_registered_callables(db: Db) -> None:
    await bl.ping(db.conn, "r", kit_jobs.take, kit_jobs.move)
    await db.execute("UPDATE batchloop.workers SET worker = 'kit_never_imported:evil'")
    with pytest.raises(NotRegisteredError, match="kit_never_imported:evil, the worker stored"):
        await drain(db.conn, "r")
    assert "kit_never_imported" not in sys.modules


async def test_drain_needs_one_connection(batchloop_dsn: str) -> None:
    pool = await asyncpg.create_pool(batchloop_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(TypeError, match=r"needs one connection.*acquire a connection"):
            await drain(pool, "x")
    finally:
        await pool.close()


async def test_drain_a_stopped_name_runs_nothing(db: Db) -> None:
    await _items(db, "st", 2)
    await bl.ping(db.conn, "st", kit_jobs.take, kit_jobs.move)
    assert await bl.stop(db.conn, "st")
    assert await drain(db.conn, "st") == 0
    assert await db.value("SELECT count(*) FROM kit_items") == 2


# ------------------------------------------------------------------ batchloop_host, wait_idle


@pytest.mark.batchloop_modules("kit_jobs")
async def test_host_runs_the_marked_modules(batchloop_host: bl.Host, batchloop_dsn: str) -> None:
    assert list(batchloop_host.modules) == ["kit_jobs"]
    conn = await asyncpg.connect(batchloop_dsn)
    try:
        await conn.execute(kit_jobs.SCHEMA)
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO kit_items (queue) SELECT 'h' FROM generate_series(1, 5)"
            )
            await bl.ping(conn, "h", kit_jobs.take, kit_jobs.move)
        status = await wait_idle(conn, "h", timeout=20)
        assert status.state == "idle" and status.batches == 3
        assert await conn.fetchval("SELECT count(*) FROM kit_done") == 5
    finally:
        await conn.close()


@pytest.mark.batchloop_modules("kit_jobs", driver="psycopg", shutdown_grace=2.0)
async def test_marker_keywords_go_to_the_host(batchloop_host: bl.Host, batchloop_dsn: str) -> None:
    assert batchloop_host.driver == "psycopg" and batchloop_host.shutdown_grace == 2.0
    conn = await psycopg.AsyncConnection.connect(batchloop_dsn, autocommit=True)
    try:
        await conn.execute(kit_jobs.SCHEMA)
        async with conn.transaction():
            await conn.execute("INSERT INTO kit_items (queue) VALUES ('w'), ('w'), ('w')")
            await bl.ping(conn, "w", kit_jobs.take_then_wait, kit_jobs.move)
        # Waiting (Idle with a 120 s timeout), not due: finished, and its owner keeps it.
        status = await wait_idle(batchloop_dsn, "w", timeout=20)
        assert status.state == "waiting" and status.owner_alive
        with pytest.raises(DrainRefused, match="a live host runs 'w'"):
            await drain(conn, "w")
    finally:
        await conn.close()


async def test_wait_idle_times_out_when_no_host_runs_it(db: Db) -> None:
    await _items(db, "t", 1)
    await bl.ping(db.conn, "t", kit_jobs.take, kit_jobs.move)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"'t' still running with no host holding it"):
        await wait_idle(db.conn, "t", timeout=0.3)
    assert time.monotonic() - started < 10  # it gave up, rather than hang (not a timing test)
    with pytest.raises(UnknownWorkerError):
        await wait_idle(db.conn, "nope", timeout=0.1)


async def test_a_waiting_name_due_soon_is_not_finished(db: Db) -> None:
    await bl.ping(db.conn, "d", kit_jobs.take_then_wait, kit_jobs.move)
    await db.execute("UPDATE batchloop.workers SET status = 'waiting' WHERE name = 'd'")
    for seconds, done in [(0.5, False), (30.0, True)]:
        await db.execute(
            "UPDATE batchloop.worker_state SET next_run_at = clock_timestamp()"
            " + make_interval(secs => $1) WHERE name = 'd'",
            seconds,
        )
        if done:
            assert (await wait_idle(db.conn, "d", timeout=1)).state == "waiting"
        else:
            with pytest.raises(TimeoutError, match="'d' still waiting"):
                await wait_idle(db.conn, "d", timeout=0.2)


# ------------------------------------------------------------------------ docs and the template


def _doc_files() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    files = dict(re.findall(r"```python\n# file: (\S+\.py)\n(.*?)```", text, re.DOTALL))
    assert {"myapp_jobs.py", "test_myapp.py"} <= set(files), sorted(files)
    return files


def test_docs_example_runs_under_a_plain_pytest(pg_admin_dsn: str, tmp_path: Path) -> None:
    for name, body in _doc_files().items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "BATCHLOOP_"))}
    env.update(DATABASE_URL=pg_admin_dsn, PYTHONPATH=str(tmp_path))
    done = subprocess.run(
        # No -p batchloop...: the entry point loads the plugin; --strict-markers proves the
        # marker is registered. No rootdir config of ours: a project of its own.
        [sys.executable, "-m", "pytest", "-q", "--strict-markers", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert re.search(r"\b[3-9] passed\b", done.stdout), done.stdout


def test_plugin_connects_only_for_its_fixtures_and_a_bad_server_is_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "test_x.py").write_text(
        "def test_needs_nothing():\n    pass\n\n\n"
        "def test_needs_a_database(batchloop_dsn):\n    pass\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "BATCHLOOP_"))}
    env["DATABASE_URL"] = "postgresql://nobody:s3cret@127.0.0.1:1/nowhere"  # nothing listens
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_x.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "1 passed, 1 error" in out, out
    assert "s3cret" not in out
    (line,) = [x for x in out.splitlines() if x.startswith("DATABASE_URL (")]
    assert line.startswith("DATABASE_URL (postgresql://nobody:***@127.0.0.1:1/nowhere) does not")


def test_template_copy_versus_migrate(pg_admin_dsn: str, batchloop_template: str) -> None:
    """What a migrated database costs per test: a copy of the template, or an empty database
    plus ``migrate``. Reported, not asserted (``pytest -s -k template`` prints it)."""
    rounds = 5
    copy, fresh, migrate = [], [], []
    for _ in range(rounds):
        started = time.perf_counter()
        with databases.fresh_database(pg_admin_dsn, template=batchloop_template) as url:
            copy.append(time.perf_counter() - started)
            copied = _catalog(url)
        started = time.perf_counter()
        with databases.fresh_database(pg_admin_dsn) as url:
            fresh.append(time.perf_counter() - started)
            databases.migrate_sync(url)
            migrate.append(time.perf_counter() - started)
            migrated = _catalog(url)
        assert copied == migrated  # the copy is the migration's result, object for object
    ms = {k: 1000 * sorted(v)[rounds // 2] for k, v in [("copy", copy), ("create", fresh)]}
    ms["create+migrate"] = 1000 * sorted(migrate)[rounds // 2]
    print(
        f"\nper-test database, median of {rounds}: template copy {ms['copy']:.1f} ms, "
        f"empty CREATE DATABASE {ms['create']:.1f} ms, "
        f"CREATE DATABASE + migrate {ms['create+migrate']:.1f} ms"
    )


def _catalog(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n ON n.oid = "
            "c.relnamespace WHERE n.nspname = 'batchloop' "
            "UNION ALL SELECT p.proname, 'f' FROM pg_proc p JOIN pg_namespace n ON n.oid = "
            "p.pronamespace WHERE n.nspname = 'batchloop' ORDER BY 1, 2"
        ).fetchall()
        rows += conn.execute("SELECT version FROM batchloop.schema_migrations").fetchall()
    assert len(rows) > 10
    return rows
