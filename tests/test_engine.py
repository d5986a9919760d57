"""Integration tests of the engine against a real PostgreSQL: one host at a time."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import asyncpg
import pytest

import batchloop as bl
from batchloop.migrations import code_version
from batchloop.schema_name import channel
from batchloop.testing import wait_idle

from helpers import count as _count
from helpers import wait_for
from jobs import (
    bad_batch_query,
    create_tables,
    insert_and_ping,
    knobs,
    next_items,
    process_items,
    typed_worker,
    undecorated,
)

pytestmark = pytest.mark.anyio


async def _setup(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await create_tables(conn)
    return conn


async def _state(conn: Any, name: str) -> str | None:
    st = await bl.status(conn, name)
    return st.state if st else None


@pytest.mark.batchloop_modules("jobs")
async def test_ping_creates_worker_and_host_drains_it(
    batchloop_host: bl.Host, batchloop_dsn: str
) -> None:
    conn = await _setup(batchloop_dsn)
    assert await insert_and_ping(conn, "drain", 250) == "created"
    await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=250)
    st = await bl.status(conn, "drain")
    assert st is not None and st.batches == 3 and st.generation >= 1
    assert st.work_query == "jobs:next_items" and st.worker == "jobs:process_items"
    assert st.last_work_at is not None and st.last_work_at.tzinfo is not None
    assert st.owner is not None and st.owner.host_id == batchloop_host.host_id
    idle = await wait_idle(conn, "drain")
    assert idle.state == "idle" and idle.owner is None and idle.batches == 3
    assert await _count(conn, "SELECT count(*) FROM items") == 0
    # a later ping wakes it again
    assert await insert_and_ping(conn, "drain", 5) == "woken"
    await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=255)
    await conn.close()


async def test_ping_refuses_unregistered_callables_and_creates_nothing(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)

    async def closure(c: Any, name: str) -> bl.Idle:
        return bl.Idle()

    for query in (undecorated, lambda c, n: None, closure):
        with pytest.raises(bl.NotRegisteredError, match=r"@batchloop\.work_query"):
            await bl.ping(conn, "x", query, process_items)
    with pytest.raises(bl.NotRegisteredError, match="registered as a work_query"):
        await bl.ping(conn, "x", next_items, next_items)
    assert await _count(conn, "SELECT count(*) FROM batchloop.workers") == 0
    await conn.close()


async def test_bad_names_raise_before_any_sql(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await conn.close()  # any SQL would now fail with InterfaceError, not ValueError
    for name in ("", "x" * 201, None, 5):
        with pytest.raises(ValueError, match="1 to 200"):
            await bl.ping(conn, name, next_items, process_items)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await bl.stop(conn, name)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            await bl.status(conn, name)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="schema"):
        await bl.ping(conn, "ok", next_items, process_items, schema='x"; DROP')


async def test_ping_on_running_worker_writes_nothing(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    # No host: the worker stays "running" after creation.
    await insert_and_ping(conn, "quiet", 1)
    before = await conn.fetchrow("SELECT xmin::text AS x FROM batchloop.workers WHERE name='quiet'")
    async with conn.transaction():
        assert await bl.ping(conn, "quiet", next_items, process_items) == "unchanged"
        # No xid assigned means no row written and no row locked by ping.
        assert await conn.fetchval("SELECT pg_current_xact_id_if_assigned()") is None
    after = await conn.fetchrow("SELECT xmin::text AS x FROM batchloop.workers WHERE name='quiet'")
    assert before == after
    await conn.close()


async def test_ping_without_config_keeps_stored_config(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    cfg = bl.Config(debounce=0.5, monitor_lag=12.0)
    await insert_and_ping(conn, "cfg", 1, config=cfg)
    assert await insert_and_ping(conn, "cfg", 1) == "unchanged"
    st = await bl.status(conn, "cfg")
    assert st is not None and st.config == cfg
    assert await insert_and_ping(conn, "cfg", 1, config=bl.Config()) == "updated"
    st = await bl.status(conn, "cfg")
    assert st is not None and st.config == bl.Config()
    await conn.close()


async def test_debounce_delays_first_batch(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        t0 = await conn.fetchval("SELECT clock_timestamp()")
        await insert_and_ping(conn, "deb", 1, config=bl.Config(debounce=0.6))
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=1)
        started = await conn.fetchval("SELECT min(started) FROM done")
        assert (started - t0).total_seconds() >= 0.6
    await conn.close()


async def test_worker_debounce_delays_next_run_and_ignores_pings(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    k = knobs("wdeb")
    k.limit, k.debounce = 1, 0.8
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await insert_and_ping(conn, "wdeb", 2)
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=1)
        assert await insert_and_ping(conn, "wdeb", 1) == "unchanged"
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=3, timeout=10)
        gaps = await conn.fetch(
            "SELECT started - lag(finished) OVER (ORDER BY started) AS gap FROM done"
        )
        assert all(g["gap"].total_seconds() >= 0.75 for g in gaps[1:])
    await conn.close()


async def test_failure_rolls_back_records_and_retries(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    knobs("flaky").fail_times = 2
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await insert_and_ping(conn, "flaky", 3)
        st = await wait_for(lambda: _failed_status(conn, "flaky", 2), timeout=10)
        assert "injected failure for flaky" in (st.last_error or "")
        # the failed attempts' writes rolled back: done has nothing yet, items still there
        assert await _count(conn, "SELECT count(*) FROM done") in (0, 3)
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=3)
        st2 = await wait_for(lambda: _batches(conn, "flaky"), expect=1)
        final = await bl.status(conn, "flaky")
        assert final is not None and final.consecutive_failures == 0
        assert final.last_error and "injected" in final.last_error  # kept for inspection
        assert st2 == 1
        # exactly one committed processing of each item
        assert await _count(conn, "SELECT count(DISTINCT item_id) FROM done") == 3
    await conn.close()


async def _failed_status(conn: Any, name: str, n: int) -> bl.WorkerStatus | None:
    st = await bl.status(conn, name)
    return st if st is not None and st.consecutive_failures >= n else None


async def _batches(conn: Any, name: str) -> int:
    st = await bl.status(conn, name)
    return st.batches if st else 0


async def test_batch_annotation_mismatch_is_a_recorded_failure(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await bl.ping(conn, "typed", bad_batch_query, typed_worker)
        st = await wait_for(lambda: _failed_status(conn, "typed", 1))
        assert "does not match the `batch` annotation of jobs:typed_worker" in (st.last_error or "")
        assert st.batches == 0
    await conn.close()


async def test_stop_fences_in_flight_batch_and_start_resumes(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    other = await asyncpg.connect(migrated_dsn)
    k = knobs("halt")
    k.limit, k.gate = 1, asyncio.Event()
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await insert_and_ping(conn, "halt", 3)
        await asyncio.wait_for(k.entered.wait(), 10)
        stop_task = asyncio.create_task(bl.stop(other, "halt"))
        await asyncio.sleep(0.3)
        assert not stop_task.done(), "stop must wait for the in-flight batch's transaction"
        k.gate.set()
        assert await asyncio.wait_for(stop_task, 10) is True
        committed = await _count(conn, "SELECT count(*) FROM done")
        assert committed == 1
        assert await _state(conn, "halt") == "stopped"
        assert await insert_and_ping(conn, "halt", 1) == "stopped"  # pings are ignored
        await asyncio.sleep(1.0)  # give a zombie loop every chance to commit (must not)
        assert await _count(conn, "SELECT count(*) FROM done") == committed
        assert await bl.stop(conn, "halt") is True  # idempotent
        assert await bl.start(conn, "halt") is True
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=4)
        assert await bl.stop(conn, "nope") is False
    await other.close()
    await conn.close()


async def test_waiting_worker_wakes_on_time_even_after_its_host_exits(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    k = knobs("later")
    k.idle = bl.Idle(timeout=2.0, cooldown=0.0)
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await insert_and_ping(conn, "later", 1)
        assert await wait_for(lambda: _state(conn, "later"), expect="waiting")
    st = await bl.status(conn, "later")
    assert st is not None and st.next_run_at is not None
    calls_before = await _count(conn, "SELECT count(*) FROM calls")
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await wait_for(
            lambda: _count(conn, "SELECT count(*) FROM calls WHERE at >= $1", st.next_run_at),
            expect=lambda n: n >= 1,
            timeout=6,
        )
        first = await conn.fetchval("SELECT min(at) FROM calls WHERE at >= $1", st.next_run_at)
        assert (first - st.next_run_at).total_seconds() < 1.5
    assert await _count(conn, "SELECT count(*) FROM calls") > calls_before
    await conn.close()


async def test_ping_wakes_waiting_worker_early(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    knobs("nap").idle = bl.Idle(timeout=60.0, cooldown=0.0)
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await bl.ping(conn, "nap", next_items, process_items)
        assert await wait_for(lambda: _state(conn, "nap"), expect="waiting")
        assert await insert_and_ping(conn, "nap", 2) == "woken"
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=2, timeout=5)
    await conn.close()


async def test_short_idle_timeout_keeps_worker_running(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    knobs("short").idle = bl.Idle(timeout=0.5, cooldown=0.0)
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await bl.ping(conn, "short", next_items, process_items)
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM calls"), expect=lambda n: n >= 4)
        assert await _state(conn, "short") == "running"
    await conn.close()


async def test_schema_missing_and_too_new_are_refused(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    with pytest.raises(bl.SchemaMissingError, match="batchloop migrate"):
        await bl.ping(conn, "x", next_items, process_items)
    with pytest.raises(bl.SchemaMissingError, match="batchloop migrate"):
        await bl.status(conn, "x")
    with pytest.raises(bl.SchemaMissingError, match="batchloop migrate"):
        async with bl.Host(dsn):
            pass
    await bl.migrate(dsn)
    await conn.execute(
        "INSERT INTO batchloop.schema_migrations VALUES (99, 'future');"
        "CREATE OR REPLACE FUNCTION batchloop.schema_version() RETURNS integer "
        "LANGUAGE sql IMMUTABLE AS 'SELECT 99'"
    )
    with pytest.raises(bl.SchemaTooNewError, match="newer"):
        await bl.ping(conn, "x", next_items, process_items)
    with pytest.raises(bl.SchemaTooNewError):
        await bl.migrate(dsn)
    with pytest.raises(bl.SchemaTooNewError):
        async with bl.Host(dsn):
            pass
    assert await _count(conn, "SELECT count(*) FROM batchloop.workers") == 0
    await conn.close()


async def test_concurrent_migrations_apply_each_file_once(dsn: str) -> None:
    results = await asyncio.gather(*(bl.migrate(dsn) for _ in range(6)))
    applied = sorted(v for r in results for v in r)
    assert applied == list(range(1, code_version() + 1)) and code_version() >= 2
    conn = await asyncpg.connect(dsn)
    assert await _count(conn, "SELECT count(*) FROM batchloop.schema_migrations") == code_version()
    await conn.close()


async def test_custom_schema(dsn: str) -> None:
    await bl.migrate(dsn, schema="jobs_q")
    conn = await _setup(dsn)
    async with bl.Host(dsn, modules=["jobs"], schema="jobs_q"):
        async with conn.transaction():
            await conn.execute("INSERT INTO items (name) VALUES ('s')")
            await bl.ping(conn, "s", next_items, typed_worker, schema="jobs_q")
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0)
    assert [w.name for w in await bl.list_workers(conn, schema="jobs_q")] == ["s"]
    with pytest.raises(bl.SchemaMissingError):
        await bl.list_workers(conn)
    await conn.close()


async def test_host_never_runs_a_callable_only_a_row_names(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    await conn.execute(
        "INSERT INTO batchloop.workers"
        " (name, lock_key, wake_key, work_query, worker, config, status)"
        " VALUES ('evil', 1, 2, 'os:system', 'os:system', '{}', 'running');"
        "INSERT INTO batchloop.worker_state (name) VALUES ('evil')"
    )
    async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
        await insert_and_ping(conn, "good", 1)
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=1)
        assert "evil" not in host.owned()
        st = await bl.status(conn, "evil")
        assert st is not None and st.generation == 0 and st.owner is None
    await conn.close()


async def test_repeatable_read_ping_refuses_stale_snapshot(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    other = await asyncpg.connect(migrated_dsn)
    await insert_and_ping(conn, "rr", 1)  # running, no host
    tr = conn.transaction(isolation="repeatable_read")
    await tr.start()
    await conn.fetchval("SELECT count(*) FROM items")  # snapshot taken: worker is running
    # a go-idle commits after the snapshot (what a loop does when the queue drains)
    await other.execute("UPDATE batchloop.workers SET status = 'idle' WHERE name = 'rr'")
    await conn.execute("INSERT INTO items (name) VALUES ('rr')")
    with pytest.raises(asyncpg.SerializationError):
        await bl.ping(conn, "rr", next_items, process_items)
    await tr.rollback()
    # retried as a fresh transaction it sees idle and wakes the worker
    async with conn.transaction(isolation="repeatable_read"):
        await conn.execute("INSERT INTO items (name) VALUES ('rr')")
        assert await bl.ping(conn, "rr", next_items, process_items) == "woken"
    await other.close()
    await conn.close()


async def test_ping_near_a_waiting_deadline_leaves_it_alone(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    await bl.ping(conn, "soon", next_items, process_items)
    # As a loop would leave it: waiting, due in 0.5 s (no host runs here).
    await conn.execute(
        "UPDATE batchloop.workers SET status = 'waiting' WHERE name = 'soon';"
        "UPDATE batchloop.worker_state SET next_run_at = now() + interval '0.5 s'"
        " WHERE name = 'soon'"
    )
    assert await bl.ping(conn, "soon", next_items, process_items) == "unchanged"
    assert await _state(conn, "soon") == "waiting"
    await conn.execute(
        "UPDATE batchloop.worker_state SET next_run_at = now() + interval '5 s' WHERE name = 'soon'"
    )
    assert await bl.ping(conn, "soon", next_items, process_items) == "woken"
    assert await _state(conn, "soon") == "running"
    await conn.close()


async def test_changed_callables_take_effect_on_a_running_loop(migrated_dsn: str) -> None:
    conn = await _setup(migrated_dsn)
    k = knobs("swap")
    k.limit, k.sleep = 1, 0.05
    async with bl.Host(migrated_dsn, modules=["jobs"]):
        await insert_and_ping(conn, "swap", 40)
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM done"), expect=lambda n: n >= 2)
        async with conn.transaction():
            assert await bl.ping(conn, "swap", next_items, typed_worker) == "updated"
        # typed_worker deletes without recording in `done`: the backlog drains, done stops growing
        await wait_for(lambda: _count(conn, "SELECT count(*) FROM items"), expect=0)
        st = await bl.status(conn, "swap")
        assert st is not None and st.worker == "jobs:typed_worker"
        assert await _count(conn, "SELECT count(*) FROM done") < 40
    await conn.close()


@pytest.mark.parametrize("schema", ["batchloop", "Mixed_Case_2"])
async def test_lock_keys_and_channel_are_the_documented_formula(dsn: str, schema: str) -> None:
    """Migration 3 rewrote lock_key() and channel() with the schema as a literal: the values
    must be what the first version computed (md5 of kind, schema and name; the Python side's
    channel name), or hosts of different versions would disagree about locks."""
    await bl.migrate(dsn, schema=schema)
    conn = await asyncpg.connect(dsn)
    q = '"' + schema.replace('"', '""') + '"'
    for kind, name in [("own", "a"), ("stop", "x y"), ("wake", "ünï")]:
        digest = hashlib.md5(f"{kind}:{schema}:{name}".encode()).digest()
        expected = int.from_bytes(digest[:8], "big", signed=True)
        assert await conn.fetchval(f"SELECT {q}.lock_key($1, $2)", kind, name) == expected
    assert await conn.fetchval(f"SELECT {q}.channel()") == channel(schema)
    await conn.close()
