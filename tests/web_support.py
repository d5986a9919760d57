"""A real ``batchloop web`` server process and Debian's chromium driven by Playwright, shared by
tests/test_web.py and bench/web_delay.py. Playwright never downloads a browser here: it drives
/usr/bin/chromium (``apt-get install chromium``) through ``executable_path``."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

CHROMIUM = os.environ.get("BATCHLOOP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright; never `playwright install`)"
    if not (os.access(CHROMIUM, os.X_OK) or shutil.which(CHROMIUM)):
        return f"no chromium at {CHROMIUM} (apt-get install chromium)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def web_server(dsn: str, *, token: str | None = None, timeout: float = 30.0) -> Iterator[str]:
    """``batchloop web`` in its own process on a free port; yields its base URL once it answers."""
    port = free_port()
    env = {**os.environ, "BATCHLOOP_DSN": dsn}
    env.pop("BATCHLOOP_TOKEN", None)
    cmd = [sys.executable, "-m", "batchloop", "web", "--port", str(port)]
    if token is not None:
        cmd += ["--token", token]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:  # polls until the server answers (it binds after printing its banner)
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"batchloop web exited with {proc.returncode}: {out}")
            try:
                with urllib.request.urlopen(url + "/api/session", timeout=2) as res:
                    if res.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"batchloop web did not answer on {url}") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


@contextlib.contextmanager
def browser_page() -> Iterator[Any]:
    """A fresh page in a headless chromium (Playwright's sync API)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            yield page
        finally:
            browser.close()
