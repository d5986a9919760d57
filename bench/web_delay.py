"""The status page's update delay: from a state change committed in the database to the
browser's DOM showing it, without a reload.

    python bench/web_delay.py [--changes 20] [--screenshot docs/status-page.png]

A real ``batchloop web`` process on a free port, a headless Debian chromium driven by
Playwright (``executable_path=/usr/bin/chromium``; nothing downloaded). The script stops and
starts one worker ``--changes`` times; after each commit it waits for the page's row to show the
new state. The page stamps the change with a MutationObserver (``performance.timeOrigin +
performance.now()``, the same wall clock as ``time.time()`` on this machine), so Playwright's own
polling adds nothing. The page polls every second, so expect about half a second plus one
request. ``--screenshot`` also drains some work with a host process and saves the page.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from web_support import browser_missing, browser_page, web_server  # noqa: E402

import batchloop.sync as bls  # noqa: E402

from jobs import TABLES, next_items, process_items  # noqa: E402

OBSERVE = """(name) => {
  window.__changes = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (r.attributeName === "data-state" && r.target.dataset.key === name) {
        window.__changes.push([r.target.dataset.state, performance.timeOrigin + performance.now()]);
      }
    }
  }).observe(document.querySelector("#workers tbody"), {attributes: true, subtree: true});
}"""


@contextlib.contextmanager
def database(admin_dsn: str) -> Iterator[str]:
    name = f"bench_web_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = admin_dsn.rpartition("/")
    dsn = f"{base}/{name}"
    try:
        bls.migrate(dsn)
        with psycopg.connect(dsn) as conn:
            conn.execute(TABLES)
        yield dsn
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(dsn: str, changes: int) -> list[float]:
    with psycopg.connect(dsn) as conn:
        bls.ping(conn, "delay", next_items, process_items)
    delays = []
    with web_server(dsn) as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector("#workers tbody tr[data-key='delay']", timeout=15_000)
        page.evaluate(OBSERVE, "delay")
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(changes):
                stopping = i % 2 == 0
                (bls.stop if stopping else bls.start)(conn, "delay")
                committed = time.time()
                match = "c[0] === 'stopped'" if stopping else "c[0] !== 'stopped'"
                page.wait_for_function(f"() => window.__changes.some(c => {match})", timeout=15_000)
                seen = page.evaluate(f"window.__changes.find(c => {match})[1]")
                page.evaluate("window.__changes = []")
                delays.append(seen / 1000 - committed)
                # Spread the changes over the poll period instead of locking onto its phase.
                time.sleep(0.137 * (i % 7))
    return delays


def screenshot(dsn: str, out: Path) -> None:
    with psycopg.connect(dsn) as conn:
        for name, items in (("emails", 300_000), ("thumbnails", 150_000), ("webhooks", 0)):
            conn.execute(
                "INSERT INTO items (name, value) SELECT %s, g FROM generate_series(1, %s) g",
                (name, items),
            )
            bls.ping(conn, name, next_items, process_items)
        bls.stop(conn, "webhooks")
        conn.execute(
            "UPDATE batchloop.worker_state SET last_error = %s, last_error_at = now(),"
            " consecutive_failures = 3 WHERE name = 'webhooks'",
            (
                'Traceback (most recent call last):\n  File "hooks.py", line 12, in deliver\n'
                "httpx.ConnectTimeout: POST https://partner.example/hook timed out",
            ),
        )
    env = {**os.environ, "BATCHLOOP_DSN": dsn, "PYTHONPATH": str(ROOT / "tests")}
    host = subprocess.Popen(
        [sys.executable, "-m", "batchloop", "run", "jobs"],
        env=env,
        cwd=ROOT / "tests",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with web_server(dsn, token="demo") as url, browser_page() as page:
            page.goto(url + "/")
            page.fill("#token", "demo")
            page.click("#token-form button")
            page.wait_for_selector("text=actions enabled", timeout=15_000)
            # batches/s needs two refreshes while the host drains.
            page.wait_for_function(
                "() => [...document.querySelectorAll('td.rate')].some(td => +td.textContent > 0)",
                timeout=30_000,
            )
            page.locator("tr[data-key='webhooks'] summary").click()
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
    finally:
        host.terminate()
        host.wait(30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DATABASE_URL") or "postgresql://root@127.0.0.1:5432/postgres",
        help="server (admin) URL; the script creates and drops its own database",
    )
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--screenshot", type=Path, default=None, metavar="PNG")
    args = parser.parse_args(argv)
    missing = browser_missing()
    if missing:
        raise SystemExit(f"web_delay: {missing}")
    with database(args.dsn) as dsn:
        delays = measure(dsn, args.changes)
        ms = sorted(d * 1000 for d in delays)
        print(
            json.dumps(
                {
                    "changes": len(ms),
                    "p50_ms": round(statistics.median(ms), 1),
                    "min_ms": round(ms[0], 1),
                    "max_ms": round(ms[-1], 1),
                    "poll_ms": 1000,
                }
            )
        )
        if args.screenshot:
            screenshot(dsn, args.screenshot)
            print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
