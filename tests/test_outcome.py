"""Commit-outcome callbacks (batchloop.runtime.outcome): called after the iteration's
transaction ends, with whether it committed; never before, never twice."""

from __future__ import annotations

import asyncpg
import outcome_jobs
import pytest

import batchloop as bl
from batchloop.runtime.outcome import on_outcome

pytestmark = pytest.mark.anyio


async def test_callbacks_learn_whether_the_batch_committed(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    try:
        await conn.execute("CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL)")
        await conn.execute("INSERT INTO items (name) SELECT 'o' FROM generate_series(1, 4)")
        outcome_jobs.OUTCOMES.clear()
        outcome_jobs.FAIL["times"] = 1
        await bl.ping(conn, "o", outcome_jobs.take, outcome_jobs.put)
        first = await bl.tick(migrated_dsn, ["o"], budget=5)
        assert [f.name for f in first.failed] == ["o"]
        assert outcome_jobs.OUTCOMES == [([1, 2], False)]  # rolled back: told so, once
        await bl.wake(conn, "o")
        second = await bl.tick(migrated_dsn, ["o"], budget=5)
        assert second.drained == ["o"]
        assert outcome_jobs.OUTCOMES == [([1, 2], False), ([1, 2], True), ([3, 4], True)]
        assert await conn.fetchval("SELECT count(*) FROM items") == 0
    finally:
        await conn.close()


def test_outside_an_iteration_it_refuses() -> None:
    with pytest.raises(RuntimeError, match="only inside a work query or worker"):
        on_outcome(lambda committed: None)
