"""The status page's job queues: ``/api/queues`` (counts by status) in-process, and the live
Queues table in a real headless chromium against a real ``batchloop web`` process."""

from __future__ import annotations

import asyncio
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import pytest
import surface_jobs as sj
from web_support import browser_missing, browser_page, web_server

import batchloop.jobs as jobs

pytest.importorskip("starlette", reason="the 'web' extra (starlette) is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

with warnings.catch_warnings():  # starlette's note about httpx2, not about this project
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from batchloop.web import create_app

EVIL_QUEUE = '<img src=x onerror="window.__pwned=1">'


@jobs.job("surf.evil", queue=EVIL_QUEUE)
async def evil(ctx: jobs.JobContext, payload: sj.Number) -> None:
    return None


def _run(coro: Any) -> Any:
    """On a loop of its own in another thread: Playwright's sync API keeps one in this one."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def dispatch(dsn: str, *work: tuple[Any, Any]) -> list[int]:
    async def go() -> list[int]:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                return [await job.dispatch(conn, payload) for job, payload in work]
        finally:
            await conn.close()

    return _run(go())


def cancel(dsn: str, job_id: int) -> bool:
    async def go() -> bool:
        conn = await asyncpg.connect(dsn)
        try:
            return await jobs.cancel(conn, job_id)
        finally:
            await conn.close()

    return _run(go())


def test_api_queues_counts_by_status(migrated_dsn: str) -> None:
    with TestClient(create_app(migrated_dsn)) as client:
        assert client.get("/api/queues").json() == []
        ids = dispatch(
            migrated_dsn,
            (sj.greet, sj.Greeting(name="a")),
            (sj.greet, sj.Greeting(name="b")),
            (sj.count, sj.Number(n=1)),
        )
        assert cancel(migrated_dsn, ids[1])
        res = client.get("/api/queues")
        assert res.status_code == 200
        found = {q["queue"]: q for q in res.json()}
        assert list(found) == sorted([sj.QUEUE, sj.OTHER_QUEUE])
        main = found[sj.QUEUE]
        assert main["counts"] == {
            "pending": 1,
            "running": 0,
            "completed": 0,
            "failed": 0,
            "canceled": 1,
        }
        assert main["total"] == 2
        assert found[sj.OTHER_QUEUE]["counts"]["pending"] == 1
        assert found[sj.OTHER_QUEUE]["total"] == 1


def test_api_queues_without_jobs_table(dsn: str) -> None:
    """An unmigrated database: a clear error for the page to show, not a 500."""
    with TestClient(create_app(dsn)) as client:
        res = client.get("/api/queues")
        assert res.status_code == 503 and "batchloop migrate" in res.json()["error"]


needs_browser = pytest.mark.skipif(
    browser_missing() is not None, reason=f"browser test skipped: {browser_missing()}"
)


def _queue_js(queue: str, status: str, n: int) -> str:
    return (
        "() => [...document.querySelectorAll('#queues tbody tr')].some(tr => tr.dataset.key === "
        f"{queue!r} && tr.dataset.{status} === '{n}')"
    )


@needs_browser
def test_page_shows_queues_live(migrated_dsn: str) -> None:
    ids = dispatch(migrated_dsn, (sj.greet, sj.Greeting(name="a")), (evil, sj.Number(n=1)))
    with web_server(migrated_dsn) as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector(f"#queues tbody tr[data-key='{sj.QUEUE}']", timeout=15_000)
        assert sorted(page.locator("#queues td.queue").all_text_contents()) == sorted(
            [sj.QUEUE, EVIL_QUEUE]
        )  # shown as text, never parsed as HTML
        assert page.locator("#queues img").count() == 0
        assert page.evaluate("window.__pwned === undefined")
        row = page.locator(f"#queues tbody tr[data-key='{sj.QUEUE}']")
        assert row.locator(".count-pending").inner_text() == "1"
        page.evaluate("window.__sameDocument = true")
        # Changes made elsewhere show up without a reload: a new queue, then a cancel.
        more = dispatch(migrated_dsn, (sj.count, sj.Number(n=2)), (sj.count, sj.Number(n=3)))
        page.wait_for_function(_queue_js(sj.OTHER_QUEUE, "pending", 2), timeout=15_000)
        assert cancel(migrated_dsn, ids[0]) and cancel(migrated_dsn, more[0])
        page.wait_for_function(_queue_js(sj.QUEUE, "canceled", 1), timeout=15_000)
        page.wait_for_function(_queue_js(sj.OTHER_QUEUE, "canceled", 1), timeout=15_000)
        assert row.locator(".count-pending").inner_text() == "0"
        assert row.locator(".total").inner_text() == "1"
        assert page.evaluate("window.__sameDocument") is True
