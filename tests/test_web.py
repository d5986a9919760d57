"""The status page (``batchloop web``): its JSON and token rules in-process, and the page itself
in a real headless chromium against a real server process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import Any

import psycopg
import pytest
from web_support import browser_missing, browser_page, web_server

import batchloop
import batchloop.sync as bls

from jobs import TABLES, next_items, process_items

pytest.importorskip("starlette", reason="the 'web' extra (starlette) is not installed")
pytest.importorskip("httpx", reason="starlette's TestClient needs httpx")

with warnings.catch_warnings():  # starlette's note about httpx2, not about this project
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from batchloop.web import create_app

EVIL = '<img src=x onerror="window.__pwned=1">&amp;'
TOKEN = "s3cret-token"


def make_worker(dsn: str, name: str) -> None:
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('items')").fetchone() == (None,):
            conn.execute(TABLES)
        bls.ping(conn, name, next_items, process_items)


def set_error(dsn: str, name: str, error: str) -> None:
    """A failure as a host records it (the page only reads it)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE batchloop.worker_state SET last_error = %s, last_error_at = now(),"
            " consecutive_failures = 3 WHERE name = %s",
            (error, name),
        )


def state_of(dsn: str, name: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        found = bls.status(conn, name)
    assert found is not None
    return found.state


# ------------------------------------------------------------------ in-process (TestClient)


def test_api_workers_lists_every_worker(migrated_dsn: str) -> None:
    make_worker(migrated_dsn, "alpha")
    make_worker(migrated_dsn, EVIL)
    with TestClient(create_app(migrated_dsn)) as client:
        res = client.get("/api/workers")
        assert res.status_code == 200
        names = [w["name"] for w in res.json()]
        assert names == sorted(["alpha", EVIL])
        assert {"state", "owner", "batches", "consecutive_failures", "last_error"} <= set(
            res.json()[0]
        )
        page = client.get("/")
        assert page.status_code == 200 and "static/app.js" in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN
        assert client.get("/static/app.js").status_code == 200
        assert client.get("/static/style.css").status_code == 200


def test_read_only_without_token_refuses_actions(migrated_dsn: str) -> None:
    make_worker(migrated_dsn, "alpha")
    with TestClient(create_app(migrated_dsn)) as client:
        assert client.get("/api/session").json()["read_only"] is True
        for action in ("stop", "start", "wake"):
            res = client.post(
                f"/api/workers/{action}",
                json={"name": "alpha"},
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
            assert res.status_code == 403, action
    assert state_of(migrated_dsn, "alpha") != "stopped"


def test_token_is_needed_and_enough(migrated_dsn: str) -> None:
    make_worker(migrated_dsn, "alpha")
    with TestClient(create_app(migrated_dsn, token=TOKEN)) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            res = client.post("/api/workers/stop", json={"name": "alpha"}, headers=headers)
            assert res.status_code == 403, headers
        assert state_of(migrated_dsn, "alpha") != "stopped"
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert client.get("/api/session", headers=good).json()["authorized"] is True
        res = client.post("/api/workers/stop", json={"name": "alpha"}, headers=good)
        assert res.status_code == 200 and res.json()["state"] == "stopped"
        assert state_of(migrated_dsn, "alpha") == "stopped"
        res = client.post("/api/workers/start", json={"name": "alpha"}, headers=good)
        assert res.status_code == 200 and res.json()["state"] != "stopped"
        res = client.post("/api/workers/stop", json={"name": "nobody"}, headers=good)
        assert res.status_code == 404 and "nobody" in res.json()["error"]
        res = client.post("/api/workers/stop", content=b"not json", headers=good)
        assert res.status_code == 400


def test_empty_token_is_refused(migrated_dsn: str) -> None:
    with pytest.raises(ValueError, match="token must not be empty"):
        create_app(migrated_dsn, token="")


def test_wake_action(migrated_dsn: str) -> None:
    make_worker(migrated_dsn, "alpha")
    with TestClient(create_app(migrated_dsn, token=TOKEN)) as client:
        good = {"Authorization": f"Bearer {TOKEN}"}
        assert "wake" in client.get("/api/session").json()["actions"]
        res = client.post("/api/workers/wake", json={"name": "alpha"}, headers=good)
        assert res.status_code == 200 and res.json()["action"] == "wake"


def test_api_hosts_lists_live_hosts(migrated_dsn: str) -> None:
    import asyncio

    import jobs

    async def with_host() -> list[Any]:
        async with batchloop.Host(migrated_dsn, modules=["jobs"]):
            with TestClient(create_app(migrated_dsn)) as client:
                return list(client.get("/api/hosts").json())

    assert jobs  # the module the host runs
    found = asyncio.run(with_host())
    assert len(found) == 1 and found[0]["alive"] is True


# ------------------------------------------------------------------ a real browser

needs_browser = pytest.mark.skipif(
    browser_missing() is not None, reason=f"browser test skipped: {browser_missing()}"
)


def _post(url: str, action: str, name: str, token: str | None) -> int:
    req = urllib.request.Request(
        f"{url}/api/workers/{action}",
        data=json.dumps({"name": name}).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as res:
            return int(res.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@needs_browser
def test_page_updates_live_and_escapes(migrated_dsn: str) -> None:
    make_worker(migrated_dsn, "alpha")
    make_worker(migrated_dsn, EVIL)
    set_error(migrated_dsn, EVIL, "boom <b>bold</b>\nsecond line of the traceback")
    with web_server(migrated_dsn, token=TOKEN) as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector("#workers tbody tr td.name", timeout=15_000)
        names = page.locator("#workers td.name").all_text_contents()
        assert sorted(names) == sorted(["alpha", EVIL])  # shown as text, not parsed
        assert page.locator("#workers img, #workers b").count() == 0
        assert page.evaluate("window.__pwned === undefined")
        # The full error, on demand.
        details = page.locator("details:visible")
        assert details.count() == 1
        details.locator("summary").click()
        assert "second line of the traceback" in details.locator("pre").inner_text()
        # Read-only until the token is given: no buttons.
        assert page.locator("button.act-stop:visible").count() == 0
        # A state change made elsewhere shows up without a reload.
        page.evaluate("window.__sameDocument = true")
        with psycopg.connect(migrated_dsn, autocommit=True) as conn:
            assert bls.stop(conn, "alpha")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#workers tbody tr')]"
            ".some(tr => tr.dataset.key === 'alpha' && tr.dataset.state === 'stopped')",
            timeout=15_000,
        )
        with psycopg.connect(migrated_dsn, autocommit=True) as conn:
            assert bls.start(conn, "alpha")
        page.wait_for_function(
            "() => [...document.querySelectorAll('#workers tbody tr')]"
            ".some(tr => tr.dataset.key === 'alpha' && tr.dataset.state !== 'stopped')",
            timeout=15_000,
        )
        assert page.evaluate("window.__sameDocument") is True  # no reload happened
        # The token form enables the buttons; a click stops the worker.
        page.fill("#token", TOKEN)
        page.click("#token-form button")
        page.wait_for_selector("text=actions enabled", timeout=10_000)
        alpha = page.locator("#workers tbody tr[data-key='alpha']")
        alpha.locator("button.act-stop").click()
        page.wait_for_selector("#workers tbody tr[data-key='alpha'][data-state='stopped']")
        assert state_of(migrated_dsn, "alpha") == "stopped"
        alpha.locator("button.act-start").click()
        page.wait_for_selector(
            "#workers tbody tr[data-key='alpha']:not([data-state='stopped'])", timeout=10_000
        )
        assert state_of(migrated_dsn, "alpha") != "stopped"
        # The server itself refuses an action without the token, whatever the page shows.
        assert _post(url, "stop", "alpha", None) == 403
        assert _post(url, "stop", "alpha", "wrong") == 403
        assert state_of(migrated_dsn, "alpha") != "stopped"
        assert _post(url, "stop", "alpha", TOKEN) == 200
        assert state_of(migrated_dsn, "alpha") == "stopped"


@needs_browser
def test_read_only_page_shows_no_buttons(migrated_dsn: str) -> None:
    make_worker(migrated_dsn, "alpha")
    with web_server(migrated_dsn) as url, browser_page() as page:
        page.goto(url + "/")
        page.wait_for_selector("#workers tbody tr[data-key='alpha']", timeout=15_000)
        assert page.locator("#token-form").is_hidden()
        assert page.locator("#workers button:visible").count() == 0
        assert _post(url, "stop", "alpha", TOKEN) == 403
    assert state_of(migrated_dsn, "alpha") != "stopped"


def test_wheel_ships_the_page(tmp_path: Path) -> None:
    """The page is served from the installed package, so the wheel must carry its files."""
    root = Path(__file__).resolve().parent.parent
    built = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("batchloop-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = next(n for n in names if n.endswith("METADATA"))
        meta = zf.read(metadata).decode()
    for wanted in ("index.html", "app.js", "style.css"):
        assert f"batchloop/web/static/{wanted}" in names
    assert "Provides-Extra: web" in meta
