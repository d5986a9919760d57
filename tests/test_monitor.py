"""The monitor's takeover of a frozen owner: its backends are ended and its names claimed in
the same tick (not on the next one, ``monitor_interval`` later)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import batchloop as bl
from batchloop.runtime.session import Control

from helpers import wait_for
from jobs import create_tables, insert_and_ping

pytestmark = pytest.mark.anyio

FROZEN = "frozen0000000000"


async def test_a_frozen_owners_names_are_claimed_in_the_tick_that_ends_it(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    await insert_and_ping(conn, "f", 3)
    # A host that owns "f" and stopped heartbeating an hour ago, its backend still alive.
    frozen = await asyncpg.connect(
        migrated_dsn, server_settings={"application_name": f"batchloop/{FROZEN}"}
    )
    await conn.execute(
        "INSERT INTO batchloop.hosts (host_id, hostname, pid, heartbeat_at) "
        "VALUES ($1, 'elsewhere', 1, now() - interval '1 hour')",
        FROZEN,
    )
    await conn.execute("UPDATE batchloop.worker_state SET owner_host = $1 WHERE name = 'f'", FROZEN)
    await frozen.execute(
        "SELECT pg_advisory_lock(lock_key) FROM batchloop.workers WHERE name = 'f'"
    )
    calls: list[tuple[str, tuple[Any, ...]]] = []
    real_fetch = Control.fetch

    async def recording_fetch(self: Control, name: str, *args: Any) -> Any:
        calls.append((name, args))
        return await real_fetch(self, name, *args)

    monkeypatch.setattr(Control, "fetch", recording_fetch)
    # The first monitor tick runs before the host is ready; the next would be a minute later.
    async with bl.Host(migrated_dsn, modules=["jobs"], monitor_interval=60):
        names = [name for name, _ in calls]
        ended = names.index("terminate_host")
        assert names[ended - 1 : ended + 2] == ["orphans", "terminate_host", "forget_host"], names
        claims = [args[0] for name, args in calls[ended:] if name == "claim_many"]
        assert claims and "f" in claims[0], calls
        await wait_for(frozen.is_closed, message="the frozen host's backend was ended")
    await frozen.close()
    await conn.close()
