"""Claims in batches: a burst of pings is claimed up to fifty names per statement, and a claim
that fails half-way gives back every session lock it took."""

from __future__ import annotations

from typing import Any

import anyio
import asyncpg
import pytest

import batchloop as bl
from batchloop.drivers.asyncpg_control import AsyncpgControl
from batchloop.runtime.session import Control

from helpers import count, wait_for
from invariants import assert_invariants
from jobs import create_tables, insert_and_ping, knobs, next_items, process_items

pytestmark = pytest.mark.anyio

OUR_LOCKS = """
SELECT count(*) FROM pg_locks
 WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
"""


async def test_a_burst_of_names_is_claimed_in_batches_and_spread(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    names = [f"burst{i:03}" for i in range(300)]
    for n in names:
        knobs(n).limit = 10
        knobs(n).idle = bl.Idle(cooldown=0.0)
    claims: list[int] = []
    real_fetch = Control.fetch

    async def counting_fetch(self: Control, name: str, *args: Any) -> Any:
        if name == "claim_many":
            claims.append(len(args[0]))
        return await real_fetch(self, name, *args)

    monkeypatch.setattr(Control, "fetch", counting_fetch)
    async with (
        bl.Host(migrated_dsn, modules=["jobs"], pool_max_size=4) as a,
        bl.Host(migrated_dsn, modules=["jobs"], pool_max_size=4) as b,
    ):
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO items (name, value) SELECT n, 1 FROM unnest($1::text[]) n",
                names,
            )
            for n in names:
                await bl.ping(conn, n, next_items, process_items)
        await wait_for(lambda: count(conn, "SELECT count(*) FROM items"), expect=0, timeout=30)
        ran = await conn.fetch("SELECT DISTINCT pid FROM done")
        assert not (a.owned() & b.owned())
    await assert_invariants(conn, 300)
    # 300 names reached two hosts by 300 NOTIFYs; each host asked for them in a few statements
    # (some names twice: once on its NOTIFY, once when the loop let it go)
    assert max(claims) > 1, claims
    asked = [c for c in claims if c > 1]
    assert sum(asked) >= 300 and len(asked) < 300, claims
    assert len(ran) >= 2  # both hosts' pools ran batches
    await conn.close()


async def test_a_failed_batch_claim_gives_back_the_locks_it_took(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    for n in ("first", "boom", "last"):
        await bl.ping(conn, n, next_items, process_items)  # running, nobody owns them
    # make the claim of "boom" fail after "first" was claimed (its session lock taken)
    await conn.execute(
        """
        CREATE FUNCTION batchloop.t_boom() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.name = 'boom' AND NEW.generation <> OLD.generation THEN
                RAISE EXCEPTION 'boom';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER boom BEFORE UPDATE ON batchloop.worker_state
           FOR EACH ROW EXECUTE FUNCTION batchloop.t_boom();
        """
    )
    claimer = await asyncpg.connect(migrated_dsn)
    control = Control(AsyncpgControl(claimer), "batchloop")
    with pytest.raises(asyncpg.RaiseError, match="boom"):
        await control.fetch("claim_many", ["first", "boom", "last"], "h1", [])
    assert await count(claimer, OUR_LOCKS) == 0
    # and without the failing name, the others are claimed and locked
    rows = await control.fetch("claim_many", ["first", "last", "nope"], "h1", [])
    assert [r["name"] for r in rows] == ["first", "last"]
    assert await count(claimer, OUR_LOCKS) == 2
    # unlocking as part of the next claim
    rows = await control.fetch("claim_many", [], "h1", [r["lock_key"] for r in rows])
    assert rows == [] and await count(claimer, OUR_LOCKS) == 0
    control.detach()
    await claimer.close()
    await conn.close()


async def test_loops_ending_together_share_their_release_statements(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control connection runs one statement at a time: while one release (unlock and
    re-check) is out, the loops that end meanwhile queue up, and go 50 to a statement."""
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    names = [f"end{i:03}" for i in range(120)]
    for n in names:
        knobs(n).idle = bl.Idle(cooldown=0.0)
    releases: list[int] = []
    gate = anyio.Event()
    real_fetch = Control.fetch

    async def held_release(self: Control, name: str, *args: Any) -> Any:
        if name == "claim_many" and args[2]:
            releases.append(len(args[2]))
            await gate.wait()  # the first release stays out until every loop has ended
        return await real_fetch(self, name, *args)

    monkeypatch.setattr(Control, "fetch", held_release)
    async with bl.Host(migrated_dsn, modules=["jobs"]) as host:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO items (name, value) SELECT n, 1 FROM unnest($1::text[]) n", names
            )
            for n in names:
                await bl.ping(conn, n, next_items, process_items)
        await wait_for(lambda: count(conn, "SELECT count(*) FROM done"), expect=120, timeout=30)
        await wait_for(lambda: not host.owned(), timeout=30, message="loops still running")
        assert releases == [1]  # one went out; the other 119 wait behind it
        gate.set()
        await wait_for(
            lambda: count(
                conn,
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
                " WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND a.application_name = $1",
                host.application_name,
            ),
            expect=0,
            timeout=30,
        )
    assert sum(releases) == 120 and len(releases) == 1 + 3, releases  # 1, then 50 + 50 + 19
    assert await count(conn, "SELECT count(*) FROM batchloop.workers WHERE status <> 'idle'") == 0
    await conn.close()


async def test_a_host_over_its_share_lets_the_others_claim_first(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host A owns 20 names, host B none: new names' wake-ups reach both, A holds its claim
    back (``claim_delay``, here made long enough that B's claims always come first on a
    loaded machine) and B takes them. Without the deferral A takes most of them (tried)."""
    from batchloop.runtime import decide

    real = decide.claim_delay
    monkeypatch.setattr(decide, "claim_delay", lambda *a: 20 * real(*a))
    conn = await asyncpg.connect(migrated_dsn)
    await create_tables(conn)
    old, new = [f"old{i:02}" for i in range(20)], [f"new{i:02}" for i in range(10)]
    for n in old + new:
        knobs(n).idle = bl.Idle(cooldown=3600.0, poll_interval=1.0)  # stay owned
    try:
        # A's monitor ticks too (0.1 s): it finds a name in the moment before B claims it, and
        # holds back as the wake-ups do.
        async with bl.Host(
            migrated_dsn, modules=["jobs"], heartbeat_interval=0.1, monitor_interval=0.1
        ) as a:
            for n in old:
                await insert_and_ping(conn, n, 1)
            await wait_for(lambda: len(a.owned()), expect=20)
            async with bl.Host(migrated_dsn, modules=["jobs"], heartbeat_interval=0.1) as b:
                await wait_for(
                    lambda: (
                        (a._claims.shares.others, a._claims.shares.others_owned) == (1, 0)
                        and b._claims.shares.others_owned == 20
                    ),
                    message="the hosts never saw each other's shares",
                )
                assert a._claims.claim_delay() > 0 and b._claims.claim_delay() == 0
                for n in new:
                    await insert_and_ping(conn, n, 1)
                await wait_for(lambda: count(conn, "SELECT count(*) FROM items"), expect=0)
                assert b.owned() == set(new) and a.owned() == set(old)
    finally:
        await conn.close()
