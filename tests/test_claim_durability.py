"""Claims commit without waiting for their WAL flush (protocol.py, "Generations and fencing"),
so a server crash can lose one, and another host's claim may then reach the same generation.
The fence therefore tests the owner with the generation: a loop whose generation was claimed
again by someone else is superseded, exactly as if the generation had moved on."""

from __future__ import annotations

import logging

import asyncpg
import pytest

import batchloop as bl

from helpers import wait_for
from jobs import create_tables, insert_and_ping, knobs

pytestmark = pytest.mark.anyio


async def test_the_control_session_commits_without_waiting_for_the_flush(
    migrated_dsn: str,
) -> None:
    async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
        control = host._current.control
        assert control is not None
        async with control._lock:  # the dispatcher and the heartbeat share the connection
            rows = await control.connection.fetch("SHOW synchronous_commit", timeout=5)
    assert [tuple(r.values()) for r in rows] == [("off",)]


async def test_a_loop_whose_generation_another_owner_claimed_is_superseded(
    migrated_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What a lost claim looks like afterwards: the state row has the loop's generation with
    another host as owner. The loop must not run another batch under it."""
    caplog.set_level(logging.INFO, logger="batchloop")
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await create_tables(conn)
        # Keeps cooling (polling every 50 ms) for the whole test: the fence is met at each poll.
        knobs("lost").idle = bl.Idle(cooldown=120, poll_interval=0.05)
        async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
            await insert_and_ping(conn, "lost", 1)
            first = await wait_for(
                lambda: conn.fetchval("SELECT max(generation) FROM done WHERE name = 'lost'")
            )
            tag = await conn.execute(
                "UPDATE batchloop.worker_state SET owner_host = 'elsewhere' "
                "WHERE name = 'lost' AND generation = $1",
                first,
            )
            assert tag == "UPDATE 1"
            await wait_for(
                lambda: any(
                    f"loop 'lost' generation {first} superseded" in r.getMessage()
                    for r in caplog.records
                ),
                message="the loop went on under a generation someone else owns",
            )
            await insert_and_ping(conn, "lost", 1)
            await wait_for(
                lambda: conn.fetchval("SELECT count(*) FROM done WHERE name = 'lost'"), expect=2
            )
            gens = [
                r["generation"]
                for r in await conn.fetch(
                    "SELECT generation FROM done WHERE name = 'lost' ORDER BY started"
                )
            ]
            assert gens[0] == first and gens[1] > first
            owner = await conn.fetchval(
                "SELECT owner_host FROM batchloop.worker_state WHERE name = 'lost'"
            )
            assert owner == host.host_id
    finally:
        await conn.close()
