"""examples/recipes: each recipe runs on a real database with a real host (or tick), and does
what its docstring promises."""

from __future__ import annotations

import asyncio
import doctest
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import asyncpg
import httpx
import pytest

import batchloop as bl
from batchloop import observe

from helpers import wait_for

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the recipes are modules of the package examples.recipes
    sys.path.insert(0, str(ROOT))

from examples.recipes import llm_poller, ordered_cursor, outbox, rollup, tenants  # noqa: E402

pytestmark = pytest.mark.anyio


def module(recipe: ModuleType) -> str:
    """The recipe's module name, for ``Host(modules=[...])``."""
    return recipe.__name__


# --------------------------------------------------------------------------------------------
# Commit-order-safe cursor


class _Iterations(observe.Observer):
    def __init__(self, name: str) -> None:
        self.name = name
        self.outcomes: list[str] = []

    def iteration(self, event: observe.IterationEvent) -> None:
        if event.name == self.name:
            self.outcomes.append(event.outcome)


@pytest.fixture
def safe_iterations() -> Iterator[list[str]]:
    """The outcomes of the safe consumer's iterations, as the runtime reports them."""
    observer = _Iterations(ordered_cursor.SAFE)
    unregister = observe.register(observer)
    try:
        yield observer.outcomes
    finally:
        unregister()


async def test_cursor_out_of_order_commit_naive_loses_safe_does_not(
    migrated_dsn: str, safe_iterations: list[str]
) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    long_conn = await asyncpg.connect(migrated_dsn)
    await ordered_cursor.create_tables(conn)
    async with bl.Host(migrated_dsn, modules=[module(ordered_cursor)]):
        long_tx = long_conn.transaction()
        await long_tx.start()
        (first,) = await ordered_cursor.append(long_conn, ["long: inserted first"])
        (second,) = await ordered_cursor.publish(conn, ["short: inserted second"])
        assert first < second
        await wait_for(lambda: ordered_cursor.consumed(conn, ordered_cursor.NAIVE), expect=[second])
        # the safe consumer is held back by the open transaction: once it has run a whole
        # iteration after `second` committed, it still has passed nothing
        seen = len(safe_iterations)
        await wait_for(lambda: len(safe_iterations) >= seen + 2)
        assert await ordered_cursor.consumed(conn, ordered_cursor.SAFE) == []
        await ordered_cursor.wake_consumers(long_conn)
        await long_tx.commit()
        (third,) = await ordered_cursor.publish(conn, ["short: after the long one"])
        await wait_for(
            lambda: ordered_cursor.consumed(conn, ordered_cursor.NAIVE),
            expect=lambda ids: third in ids,
        )
        await wait_for(
            lambda: ordered_cursor.consumed(conn, ordered_cursor.SAFE),
            timeout=30,
            expect=[first, second, third],
        )
        assert await ordered_cursor.consumed(conn, ordered_cursor.NAIVE) == [second, third]
    await long_conn.close()
    await conn.close()


async def test_cursor_interleaved_long_and_short_producers_lose_nothing(
    migrated_dsn: str,
) -> None:
    """Real concurrent producer connections; each long transaction inserts early and commits
    only after several short ones committed (a condition, not a sleep)."""
    rng = random.Random(12)
    conn = await asyncpg.connect(migrated_dsn)
    await ordered_cursor.create_tables(conn)
    short_commits = 0
    progressed = asyncio.Condition()
    long_ids: list[int] = []
    all_ids: list[int] = []

    shorts = 6 * 12
    max_short_id = 0
    overtaken: list[int] = []
    """Rows of long transactions that committed after the naive cursor had moved past them."""

    async def short_producer(k: int) -> None:
        nonlocal short_commits, max_short_id
        c = await asyncpg.connect(migrated_dsn)
        try:
            for i in range(12):
                async with c.transaction():
                    ids = await ordered_cursor.append(c, [f"s{k}.{i}.{j}" for j in range(3)])
                    await ordered_cursor.wake_consumers(c)
                all_ids.extend(ids)
                async with progressed:
                    short_commits += 1
                    max_short_id = max(max_short_id, *ids)
                    progressed.notify_all()
                await asyncio.sleep(0)  # let the others interleave
        finally:
            await c.close()

    async def long_producer(k: int) -> None:
        c = await asyncpg.connect(migrated_dsn)

        async def naive_moved_on(mine: int) -> str | None:
            cursor = await c.fetchval(
                "SELECT id FROM feed_cursors WHERE consumer = $1", ordered_cursor.NAIVE
            )
            if cursor > mine:
                return "overtaken"
            if short_commits >= shorts and cursor >= max_short_id:
                return "caught up"  # no later row is coming: nothing to overtake it
            return None

        try:
            for i in range(3):
                async with progressed:
                    start = short_commits
                goal = min(start + rng.randint(4, 15), shorts)
                async with c.transaction():
                    ids = await ordered_cursor.append(c, [f"l{k}.{i}.{j}" for j in range(2)])
                    async with progressed:
                        await progressed.wait_for(lambda goal=goal: short_commits >= goal)
                    # commit only once the naive reader has moved past these rows, if it will
                    mine = max(ids)
                    why = await wait_for(lambda mine=mine: naive_moved_on(mine), timeout=30)
                    await ordered_cursor.wake_consumers(c)
                if why == "overtaken":
                    overtaken.extend(ids)
                long_ids.extend(ids)
                all_ids.extend(ids)
        finally:
            await c.close()

    async with bl.Host(migrated_dsn, modules=[module(ordered_cursor)]):
        await asyncio.wait_for(
            asyncio.gather(
                *(short_producer(k) for k in range(6)), *(long_producer(k) for k in range(3))
            ),
            60,
        )
        total = len(all_ids)
        assert total == 6 * 12 * 3 + 3 * 3 * 2
        safe = await wait_for(
            lambda: ordered_cursor.consumed(conn, ordered_cursor.SAFE),
            timeout=30,
            expect=lambda ids: len(ids) >= total,
        )
        last = max(all_ids)
        naive = await wait_for(
            lambda: ordered_cursor.consumed(conn, ordered_cursor.NAIVE),
            timeout=30,
            expect=lambda ids: last in ids,
        )
        order = await conn.fetch("SELECT id FROM feed_events ORDER BY xid, id")
    await conn.close()
    assert sorted(safe) == sorted(all_ids)  # every row, once
    assert safe == [r["id"] for r in order]  # in (xid, id) order
    lost = set(all_ids) - set(naive)
    # the bigserial cursor lost every row that committed after it had moved past (and maybe
    # short ones that committed out of order among themselves)
    assert overtaken, "no long transaction committed behind the naive cursor: nothing shown"
    assert set(overtaken) <= lost, sorted(set(overtaken) - lost)
    print(
        f"naive cursor lost {len(lost)} of {total} rows ({len(overtaken)} overtaken long ones);"
        " the safe cursor lost none"
    )


async def test_cursor_helper_sql_runs_and_refuses_bad_names(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await conn.execute('CREATE TABLE "Odd ""t""" (id int)')
    await conn.execute(bl.cursor.add_xid_column('Odd "t"', "x id"))
    table = 'FROM "Odd ""t""" t WHERE '

    async def passing() -> list[int]:
        rows = await conn.fetch("SELECT id " + table + bl.cursor.settled("x id") + " ORDER BY 1")
        return [r["id"] for r in rows]

    await conn.execute('INSERT INTO "Odd ""t""" (id) VALUES (1)')
    # it passes once every transaction older than its own has ended (on the whole server:
    # other sessions' transactions count too, hence a wait)
    await wait_for(passing, timeout=30, expect=[1])
    other = await asyncpg.connect(migrated_dsn)
    tx = other.transaction()
    await tx.start()
    await other.execute('INSERT INTO "Odd ""t""" (id) VALUES (2)')
    await conn.execute('INSERT INTO "Odd ""t""" (id) VALUES (3)')
    for _ in range(20):  # 3 committed, but after 2's transaction began: held back
        assert await passing() == [1]
        held = await conn.fetchval("SELECT count(*) " + table + bl.cursor.unsettled("x id"))
        assert held == 1  # row 3: visible, held back
    await tx.commit()
    await wait_for(passing, timeout=30, expect=[1, 2, 3])
    await other.close()
    await conn.close()
    for bad in ("", "x" * 64, "a\x00b"):
        with pytest.raises(ValueError, match="invalid column name"):
            bl.cursor.settled(bad)
    with pytest.raises(TypeError):
        bl.cursor.xid_column(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="invalid table name"):
        bl.cursor.add_xid_column("a.b.c")


def test_cursor_docstring_examples() -> None:
    result = doctest.testmod(bl.cursor, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 6 and result.failed == 0


# --------------------------------------------------------------------------------------------
# LLM batch poller


async def _simulate_three(conn: asyncpg.Connection, poll_every: float) -> None:
    outs = {
        "a": [{"custom_id": f"a{i}", "output": {"text": f"A{i}"}} for i in range(3)],
        "c": [{"custom_id": "c0", "output": {"text": "C"}}],
    }
    await llm_poller.simulate(conn, "p", "a", done_after=1, outcome="completed", results=outs["a"])
    await llm_poller.simulate(conn, "p", "b", done_after=1, outcome="expired")
    await llm_poller.simulate(conn, "p", "c", done_after=2, outcome="completed", results=outs["c"])
    async with conn.transaction():
        for batch_id in ("a", "b", "c"):
            await llm_poller.submit(conn, "p", batch_id, poll_every=poll_every)


async def test_llm_poller_on_a_host_delivers_once_and_reports(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await llm_poller.create_tables(conn)
    async with bl.Host(migrated_dsn, modules=[module(llm_poller)]):
        await _simulate_three(conn, poll_every=1.2)
        await wait_for(
            lambda: conn.fetchval("SELECT count(*) FROM llm_batches WHERE status = 'in_progress'"),
            timeout=20,
            expect=0,
        )
        # between polls the name waited for c's next poll (Idle(timeout=...)): now it is idle
        st = await wait_for(
            lambda: bl.status(conn, llm_poller.NAME), expect=lambda s: s.state == "idle"
        )
        assert st.consecutive_failures == 0
        _, total = await llm_poller.passes_since(conn, 0)
        assert (total.checked, total.delivered, total.failed) == (4, 2, 1)
        rows = await conn.fetch("SELECT batch_id, status, polls FROM llm_batches ORDER BY 1")
        assert [(r["batch_id"], r["status"], r["polls"]) for r in rows] == [
            ("a", "delivered", 1),
            ("b", "failed", 1),
            ("c", "delivered", 2),
        ]
        # a replayed poll of a delivered batch (its transaction had rolled back after the
        # provider answered, say) delivers nothing twice
        await conn.execute(
            "UPDATE llm_batches SET status = 'in_progress', next_poll_at = now() "
            "WHERE batch_id = 'a'"
        )
        async with conn.transaction():
            await bl.ping(conn, llm_poller.NAME, llm_poller.due_batches, llm_poller.poll_batches)
        await wait_for(
            lambda: conn.fetchval("SELECT status FROM llm_batches WHERE batch_id = 'a'"),
            expect="delivered",
        )
    results = await conn.fetch(
        "SELECT batch_id, custom_id, output->>'text' AS text FROM llm_results ORDER BY 1, 2"
    )
    await conn.close()
    assert [(r["batch_id"], r["custom_id"], r["text"]) for r in results] == [
        ("a", "a0", "A0"),
        ("a", "a1", "A1"),
        ("a", "a2", "A2"),
        ("c", "c0", "C"),
    ]


async def test_llm_deliver_is_idempotent(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await llm_poller.create_tables(conn)
    results = [{"custom_id": "x", "output": 1}, {"custom_id": "y", "output": 2}]
    await conn.execute("INSERT INTO llm_batches (provider, batch_id) VALUES ('p', 'z')")
    assert await llm_poller.deliver(conn, "p", "z", results) == 2
    assert await llm_poller.deliver(conn, "p", "z", results) == 0
    assert await conn.fetchval("SELECT count(*) FROM llm_results") == 2
    await conn.close()


@pytest.fixture
def cron_server(migrated_dsn: str) -> Iterator[tuple[str, str]]:
    """The cron route under a real uvicorn process; yields (url, secret)."""
    from web_support import free_port

    secret = "s3cret-" + os.urandom(8).hex()
    port = free_port()
    env = {**os.environ, "DATABASE_URL": migrated_dsn, "CRON_SECRET": secret}
    env.pop("BATCHLOOP_DSN", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", f"{module(llm_poller)}:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/cron/llm-batches"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"uvicorn exited with {proc.returncode}: {out}")
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"uvicorn did not answer on {url}") from None
                time.sleep(0.05)
        yield url, secret
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


async def test_llm_poller_cron_route_under_uvicorn(
    migrated_dsn: str, cron_server: tuple[str, str]
) -> None:
    url, secret = cron_server
    conn = await asyncpg.connect(migrated_dsn)
    await llm_poller.create_tables(conn)
    await _simulate_three(conn, poll_every=3.0)
    async with httpx.AsyncClient(timeout=30) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": secret}):
            res = await client.post(url, headers=headers)
            assert res.status_code == 401, res.text
        assert await conn.fetchval("SELECT sum(polls) FROM sim_llm_provider") == 0
        auth = {"Authorization": f"Bearer {secret}"}

        res = await client.post(url, headers=auth)
        assert res.status_code == 200, res.text
        first = res.json()
        assert (first["checked"], first["delivered"], first["failed"]) == (3, 1, 1)
        assert first["drained"] == [llm_poller.NAME] and first["errors"] == []
        st = await bl.status(conn, llm_poller.NAME)
        assert st is not None and st.state == "waiting"

        # before c is due, a cron call finds nothing to poll
        res = await client.get(url, headers=auth)
        assert res.status_code == 200, res.text
        if await conn.fetchval("SELECT next_poll_at > now() FROM llm_batches WHERE batch_id = 'c'"):
            assert res.json()["checked"] == 0, res.json()

        async def call() -> dict[str, int]:
            r = await client.post(url, headers=auth)
            assert r.status_code == 200, r.text
            return dict(r.json())

        calls = [first]
        status_c = "SELECT status FROM llm_batches WHERE batch_id = 'c'"
        while await conn.fetchval(status_c) != "delivered":
            due = await wait_for(call, timeout=15, interval=0.2, expect=lambda r: r["checked"])
            calls.append(due)
    totals = {k: sum(c[k] for c in calls) for k in ("checked", "delivered", "failed")}
    assert totals == {"checked": 4, "delivered": 2, "failed": 1}
    assert await conn.fetchval("SELECT count(*) FROM llm_results") == 4
    await conn.close()


def test_llm_cron_app_refuses_to_start_without_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CRON_SECRET", raising=False)
    with pytest.raises(SystemExit, match="CRON_SECRET"):
        llm_poller.create_app("postgresql://nobody@127.0.0.1/none")


# --------------------------------------------------------------------------------------------
# Outbox / webhooks


async def test_outbox_retries_backs_off_and_slows_down(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "BACKOFF_BASE", 0.05)
    conn = await asyncpg.connect(migrated_dsn)
    await outbox.create_tables(conn)
    with outbox.Receiver() as receiver:
        async with bl.Host(migrated_dsn, modules=[module(outbox)]):
            async with conn.transaction():
                keys = [await outbox.enqueue(conn, receiver.url, {"n": n}) for n in range(8)]
                receiver.fail_first[keys[0]] = 2
                receiver.fail_first[keys[3]] = 1
                receiver.slow_down_once = 1.0  # the very first request is told to wait
            await wait_for(lambda: len(receiver.accepted), timeout=30, expect=len(keys))
            rows = await wait_for(
                lambda: conn.fetch(
                    "SELECT idempotency_key::text AS key, status, attempts FROM webhook_outbox"
                ),
                expect=lambda rs: all(r["status"] == "delivered" for r in rs),
            )

            # a delivered row sent again (as after a rolled-back batch) carries the same key
            await conn.execute(
                "UPDATE webhook_outbox SET status = 'pending' WHERE idempotency_key = $1::uuid",
                keys[5],
            )
            async with conn.transaction():
                await bl.ping(conn, outbox.NAME, outbox.due_webhooks, outbox.send_webhooks)
            await wait_for(
                lambda: conn.fetchval(
                    "SELECT status FROM webhook_outbox WHERE idempotency_key = $1::uuid", keys[5]
                ),
                expect="delivered",
            )
    await conn.close()
    attempts = {r["key"]: r["attempts"] for r in rows}
    assert attempts[keys[0]] == 3 and attempts[keys[3]] == 2
    assert all(attempts[k] == 1 for k in keys if k not in (keys[0], keys[3]))
    assert receiver.accepted == {k: {"n": n} for n, k in enumerate(keys)}
    statuses = [s for _, _, s in receiver.requests]
    assert statuses[0] == 429 and statuses.count(429) == 1
    assert receiver.early == 0  # nothing was sent while the endpoint had asked for quiet
    assert statuses.count(500) == 3
    assert [k for _, k, s in receiver.requests if s == 200].count(keys[5]) == 2


async def test_outbox_gives_up(migrated_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "BACKOFF_BASE", 0.01)
    monkeypatch.setattr(outbox, "MAX_ATTEMPTS", 3)
    conn = await asyncpg.connect(migrated_dsn)
    await outbox.create_tables(conn)
    with outbox.Receiver() as receiver:
        async with bl.Host(migrated_dsn, modules=[module(outbox)]):
            async with conn.transaction():
                key = await outbox.enqueue(conn, receiver.url, {"n": 1})
                receiver.fail_first[key] = 100
                refused = await outbox.enqueue(conn, receiver.url + "/gone", {})
            row = await wait_for(
                lambda: conn.fetchrow(
                    "SELECT status, attempts, last_error FROM webhook_outbox "
                    "WHERE idempotency_key = $1::uuid",
                    key,
                ),
                expect=lambda r: r["status"] != "pending",
            )
            assert (row["status"], row["attempts"], row["last_error"]) == ("dead", 3, "HTTP 500")
            gone = await conn.fetchrow(
                "SELECT status, attempts, last_error FROM webhook_outbox "
                "WHERE idempotency_key = $1::uuid",
                refused,
            )
            assert tuple(gone) == ("dead", 1, "HTTP 404")  # a 4xx is not retried
            assert receiver.accepted == {}
    await conn.close()


def test_outbox_retry_after_parsing() -> None:
    assert outbox.retry_after("2") == 2.0
    assert outbox.retry_after("-5") == 0.0
    assert outbox.retry_after("1e12") == outbox.RETRY_AFTER_CAP
    assert outbox.retry_after(None) == outbox.DEFAULT_SLOW_DOWN
    assert outbox.retry_after("soon") == outbox.DEFAULT_SLOW_DOWN
    assert outbox.retry_after("nan") == outbox.DEFAULT_SLOW_DOWN
    assert outbox.retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    for attempts in range(1, 30):
        assert 0 < outbox.backoff(attempts) <= outbox.BACKOFF_CAP


# --------------------------------------------------------------------------------------------
# One name per tenant


async def test_tenants_three_hundred_names_fair_by_construction(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    await tenants.create_tables(conn)
    small = [f"t{i:03d}" for i in range(299)]
    async with bl.Host(migrated_dsn, modules=[module(tenants)]):
        async with conn.transaction():
            await tenants.enqueue(conn, "big", 3000, work_ms=2)  # 300 batches of >= 20 ms
        await wait_for(lambda: conn.fetchval("SELECT count(*) FROM tenant_batches"))
        async with conn.transaction():
            for tenant in small:  # sorted: one transaction pinging many names
                await tenants.enqueue(conn, tenant, 2)
        await wait_for(
            lambda: conn.fetchval(
                "SELECT count(DISTINCT tenant) FROM tenant_batches WHERE tenant <> 'big'"
            ),
            timeout=60,
            expect=len(small),
        )
        big_left = await conn.fetchval("SELECT count(*) FROM tenant_jobs WHERE tenant = 'big'")
        assert big_left > 0, "the big tenant finished first: the test proves nothing"

        # now one small tenant enqueues again, behind a big backlog
        probe = small[7]
        async with conn.transaction():
            before = await conn.fetchval("SELECT max(seq) FROM tenant_batches")
            await tenants.enqueue(conn, probe, 1)
        first = await wait_for(
            lambda: conn.fetchval(
                "SELECT min(seq) FROM tenant_batches WHERE tenant = $1 AND seq > $2", probe, before
            ),
            timeout=30,
        )
        between = await conn.fetchval(
            "SELECT count(*) FROM tenant_batches WHERE tenant = 'big' AND seq > $1 AND seq < $2",
            before,
            first,
        )
        backlog = await conn.fetchval("SELECT count(*) FROM tenant_jobs WHERE tenant = 'big'")
        statuses = await bl.list_workers(conn)
    await conn.close()
    assert len(statuses) == 300
    assert backlog >= 10 * tenants.BATCH  # a single queue would have made the probe wait for it
    assert between <= 10, f"the probe waited for {between} of the big tenant's batches"
    print(f"probe's first batch after {between} big batches; big still had {backlog} jobs")


# --------------------------------------------------------------------------------------------
# Periodic rollup


async def test_rollup_runs_on_schedule_without_pings(migrated_dsn: str) -> None:
    conn = await asyncpg.connect(migrated_dsn)
    late = await asyncpg.connect(migrated_dsn)
    await rollup.create_tables(conn)

    async def runs() -> int:
        return int(
            await conn.fetchval("SELECT runs FROM rollup_state WHERE name = $1", rollup.NAME)
        )

    async with bl.Host(migrated_dsn, modules=[module(rollup)]):
        async with conn.transaction():
            await rollup.schedule(conn, every=1.5)
        await wait_for(runs, expect=lambda n: n >= 1)
        # between runs the name waits: no polling, no owner work, a deadline
        st = await wait_for(
            lambda: bl.status(conn, rollup.NAME), expect=lambda s: s.state == "waiting"
        )
        assert st.next_run_at is not None and st.owner is not None
        await conn.execute(
            "INSERT INTO page_views (page) SELECT '/p' || (g % 4) FROM generate_series(1, 200) g"
        )
        # a view whose transaction stays open across a run: counted by a later run
        tx = late.transaction()
        await tx.start()
        await late.execute("INSERT INTO page_views (page) VALUES ('/late')")
        # and one committed after it: a cursor by id or xid alone would now skip '/late'
        await conn.execute("INSERT INTO page_views (page) VALUES ('/after')")
        now = await runs()
        await wait_for(runs, timeout=15, expect=lambda n: n >= now + 1)
        assert not await conn.fetchval("SELECT count(*) FROM page_view_rollup WHERE page = '/late'")
        await tx.commit()
        now = await runs()

        async def counts() -> tuple[dict[str, int], dict[str, int]]:
            counted = await conn.fetch(
                "SELECT page, sum(views) AS n FROM page_view_rollup GROUP BY 1"
            )
            raw = await conn.fetch("SELECT page, count(*) AS n FROM page_views GROUP BY 1")
            return {r["page"]: r["n"] for r in counted}, {r["page"]: r["n"] for r in raw}

        # every view counted, exactly once, by the runs after the commit (while other sessions
        # on the server hold transactions open, a run may leave the latest views to the next)
        counted, raw = await wait_for(counts, timeout=30, expect=lambda c: c[0] == c[1])
        assert await runs() > now
        now = await runs()
        await wait_for(runs, timeout=15, expect=lambda n: n > now)
        assert await counts() == (counted, raw)  # a further run counts nothing again
        st = await bl.status(conn, rollup.NAME)
    await late.close()
    await conn.close()
    assert sum(raw.values()) == 202 and raw["/late"] == 1
    assert st is not None and st.batches >= now + 1  # one batch per run, no other


# --------------------------------------------------------------------------------------------
# Each recipe runs as documented: python -m examples.recipes.NAME against DATABASE_URL


@pytest.mark.parametrize(
    ("recipe", "says"),
    [
        ("llm_poller", "b-ok: delivered after 3 polls"),
        ("outbox", "5 of 5 webhooks accepted"),
        ("tenants", "tenant 'small' got its first batch after"),
        ("ordered_cursor", "the bigserial cursor lost event 1"),
        ("rollup", "/pricing: 100 views"),
    ],
)
def test_recipe_runs_as_a_module(recipe: str, says: str, migrated_dsn: str) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHLOOP_DSN", "PGDATABASE")}
    done = subprocess.run(
        [sys.executable, "-m", f"examples.recipes.{recipe}"],
        cwd=ROOT,
        env={**env, "DATABASE_URL": migrated_dsn},
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert says in done.stdout, done.stdout + done.stderr


def test_recipe_without_a_database_url_says_how_to_run_it() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHLOOP_DSN", "DATABASE_URL")}
    done = subprocess.run(
        [sys.executable, "-m", "examples.recipes.rollup"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "usage: DATABASE_URL=postgresql://user@host/db python -m examples.recipes.rollup"
    )
