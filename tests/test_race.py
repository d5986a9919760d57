"""Revision changes against a running loop, and a work query that returns empty batches."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest
from race_jobs import TABLES, WORKERS, count_empty, empty_batches, race_query

import batchloop as bl

from helpers import count, wait_for

pytestmark = pytest.mark.anyio

ALTERNATIONS = 300


async def test_work_pinged_with_new_callables_is_run_by_them(migrated_dsn: str) -> None:
    """Each producer transaction inserts items and pings with the other worker than the last
    one. The loop is running and polling flat out, so its next iteration often meets the ping's
    row lock. Items are processed before the next switch, so every item must be processed by
    the worker its transaction pinged with: no batch may see rows committed with a revision
    change and still run the previous revision's callables."""
    conn = await asyncpg.connect(migrated_dsn)
    await conn.execute(TABLES)
    name = "switch"
    try:
        async with bl.Host(migrated_dsn, modules=["race_jobs"]):
            for i in range(ALTERNATIONS):
                tag = "ab"[i % 2]
                async with conn.transaction():
                    await conn.execute("INSERT INTO race_items (pinged) VALUES ($1)", tag)
                    got = await bl.ping(conn, name, race_query, WORKERS[tag])
                    await conn.execute("INSERT INTO race_items (pinged) VALUES ($1)", tag)
                assert got == ("created" if i == 0 else "updated"), (i, got)
                await wait_for(
                    lambda: count(conn, "SELECT count(*) FROM race_done"),
                    expect=2 * (i + 1),
                    interval=0.002,
                )
            wrong = await conn.fetch(
                "SELECT item_id, pinged, by FROM race_done WHERE pinged <> by ORDER BY item_id"
            )
            assert not wrong, (
                f"{len(wrong)} of {2 * ALTERNATIONS} items were processed by the previous "
                f"revision's worker: {[tuple(r) for r in wrong[:10]]}"
            )
            state = await conn.fetchrow(
                "SELECT w.revision, s.revision AS mirrored FROM batchloop.workers w "
                "JOIN batchloop.worker_state s USING (name) WHERE name = $1",
                name,
            )
            assert state["revision"] == state["mirrored"] == ALTERNATIONS
    finally:
        await conn.close()


async def _blocked_on_lock(conn: Any, pid: int) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = $1", pid
        )
    )


async def test_fence_rechecks_the_revision_after_waiting_for_a_ping(migrated_dsn: str) -> None:
    """The mechanism, step by step: an iteration's book_batch (and then its full fence) waits
    for the row lock of a ping that changes the callables. Once the ping commits, the waiting
    statement must see the new revision, since the work query after it sees the ping's rows."""
    import anyio

    from batchloop import sql

    producer = await asyncpg.connect(migrated_dsn)
    loop = await asyncpg.connect(migrated_dsn)
    watcher = await asyncpg.connect(migrated_dsn)
    await producer.execute(TABLES)
    name = "steps"
    try:
        assert await bl.ping(producer, name, race_query, WORKERS["a"]) == "created"
        stop_key = await producer.fetchval("SELECT batchloop.lock_key('stop', $1)", name)
        # as a claim would: the fence tests the owner with the generation
        await producer.execute(
            "UPDATE batchloop.worker_state SET owner_host = 'me' WHERE name = $1", name
        )
        loop_pid = loop.get_server_pid()

        async def while_a_ping_holds_the_row(tag: str, statement: str, *args: Any) -> Any:
            """Run ``statement`` on ``loop`` while a ping to worker ``tag`` holds the state
            row, and return its result once that ping has committed."""
            tx = producer.transaction()
            await tx.start()
            assert await bl.ping(producer, name, race_query, WORKERS[tag]) == "updated"
            result: list[Any] = []

            async def run() -> None:
                result.append(await loop.fetch(statement, *args))

            async with anyio.create_task_group() as tg:
                tg.start_soon(run)
                await wait_for(lambda: _blocked_on_lock(watcher, loop_pid))
                await tx.commit()
            return result[0]

        async with loop.transaction():
            # revision 1 loaded; a ping to b (revision 2) holds the row
            booked = await while_a_ping_holds_the_row(
                "b",
                sql.query("book_batch", "batchloop") + " RETURNING s.name",
                name,
                0,
                1,
                stop_key,
                "me",
                0,
            )
            assert booked == [], "book_batch matched the revision the ping replaced"
        async with loop.transaction():
            # the full fence, while a ping back to a (revision 3) holds the row
            fence = await while_a_ping_holds_the_row(
                "a", sql.query("fence", "batchloop"), name, 0, stop_key, "me"
            )
            assert [tuple(r) for r in fence] == [("running", 3)]
        assert await loop.fetchval(
            "SELECT s.revision = w.revision FROM batchloop.worker_state s "
            "JOIN batchloop.workers w USING (name) WHERE name = $1",
            name,
        )
    finally:
        for c in (producer, loop, watcher):
            await c.close()


async def test_every_revision_change_is_mirrored_on_the_state_row(migrated_dsn: str) -> None:
    """Running (updated), idle and waiting (woken with new callables), and a config change."""
    conn = await asyncpg.connect(migrated_dsn)
    await conn.execute(TABLES)
    name = "mirror"

    async def revisions() -> tuple[int, int]:
        row = await conn.fetchrow(
            "SELECT w.revision, s.revision AS mirrored FROM batchloop.workers w "
            "JOIN batchloop.worker_state s USING (name) WHERE name = $1",
            name,
        )
        return row["revision"], row["mirrored"]

    try:
        assert await bl.ping(conn, name, race_query, WORKERS["a"]) == "created"
        assert await revisions() == (1, 1)
        assert await bl.ping(conn, name, race_query, WORKERS["b"]) == "updated"
        assert await revisions() == (2, 2)
        assert await bl.ping(conn, name, race_query, WORKERS["b"]) == "unchanged"
        assert await revisions() == (2, 2)
        cfg = bl.Config(debounce=0.5)
        assert await bl.ping(conn, name, race_query, WORKERS["b"], config=cfg) == "updated"
        assert await revisions() == (3, 3)
        for status in ("idle", "waiting"):
            await conn.execute(
                "UPDATE batchloop.workers SET status = $2 WHERE name = $1", name, status
            )
            await conn.execute(
                "UPDATE batchloop.worker_state SET next_run_at = now() + interval '1 hour' "
                "WHERE name = $1",
                name,
            )
            tag = "a" if status == "idle" else "b"
            assert await bl.ping(conn, name, race_query, WORKERS[tag]) == "woken"
        assert await revisions() == (5, 5)
    finally:
        await conn.close()


async def test_empty_batches_are_warned_about_once_per_loop(
    migrated_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="batchloop")
    conn = await asyncpg.connect(migrated_dsn)
    name = "empty"
    try:
        async with bl.Host(migrated_dsn, modules=["race_jobs"]):
            await bl.ping(conn, name, empty_batches, count_empty)

            async def batches() -> int:
                st = await bl.status(conn, name)
                return st.batches if st is not None else 0

            await wait_for(batches, expect=lambda n: n >= 30)
            assert await bl.stop(conn, name)
        warned = [r for r in caplog.records if "returned an empty batch" in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in warned]
        assert warned[0].levelno == logging.WARNING
        assert "return batchloop.Idle()" in warned[0].getMessage()
        assert repr(name) in warned[0].getMessage()
    finally:
        await conn.close()
