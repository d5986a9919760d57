"""A loop's connection goes back to the pool reset (session state a callable left is gone),
and the reset travels with the last COMMIT before the loop sleeps: no round trip of its own."""

from __future__ import annotations

import asyncpg
import pytest
import reset_jobs

import batchloop as bl

from helpers import wait_for

pytestmark = pytest.mark.anyio


async def test_the_reset_goes_with_the_commit_and_still_resets(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY)")
        await conn.execute("INSERT INTO items SELECT FROM generate_series(1, 25)")
        reset_jobs.SENT.clear()
        async with bl.Host(migrated_dsn, pool_min_size=1, pool_max_size=1) as host:
            async with conn.transaction():
                await bl.ping(conn, "reset", reset_jobs.take, reset_jobs.put)
            await wait_for(
                lambda: bl.status(conn, "reset"),
                expect=lambda st: st is not None and st.state == "idle",
            )
            await wait_for(lambda: "reset" not in host.owned())
            sent = list(reset_jobs.SENT)  # up to the loop's release
            async with host.pool.acquire() as lent:  # the pool's only connection
                assert await lent.fetchval("SHOW work_mem") != "7MB"
                assert await lent.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    finally:
        await conn.close()
    # the go-idle iteration's COMMIT carried the reset; the release sent nothing after it
    closing = [i for i, text in enumerate(sent) if "COMMIT" in text and "RESET ALL" in text]
    assert closing, sent
    after = sent[closing[-1] + 1 :]
    assert not any("RESET ALL" in text for text in after), after
