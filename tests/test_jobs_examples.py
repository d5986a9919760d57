"""The jobs examples (examples/jobs_*.py), each served by a real uvicorn process on a real
database and driven over HTTP: the request flows of their docstrings, end to end."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from web_support import free_port

pytest.importorskip("fastapi", reason="the examples need the fastapi extra")
pytest.importorskip("uvicorn", reason="the examples need the fastapi extra (uvicorn)")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class App:
    def __init__(self, url: str) -> None:
        self.url = url

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"} if data is not None else {},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                return int(res.status), json.loads(res.read() or b"null")
        except urllib.error.HTTPError as exc:
            return int(exc.code), json.loads(exc.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, (path, status, body)
        return body

    def until(self, path: str, predicate: Any, timeout: float = 30.0) -> Any:
        """GET ``path`` until ``predicate(body)`` holds (the client polling the job)."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.get(path)
            if predicate(body):
                return body
            if time.monotonic() > deadline:
                raise AssertionError(f"{path}: condition not met in {timeout} s; last {body}")
            time.sleep(0.05)


@contextlib.contextmanager
def serve(module: str, dsn: str, timeout: float = 60.0) -> Iterator[App]:
    """``uvicorn --app-dir examples MODULE:app`` on a free port, until it answers."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHLOOP_")}
    env.update(BATCHLOOP_DSN=dsn)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLES)),
            *(f"{module}:app", "--port", str(port), "--log-level", "warning"),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    app = App(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"uvicorn {module} exited with {proc.returncode}: {out}")
            try:
                with urllib.request.urlopen(app.url + "/openapi.json", timeout=2) as res:
                    if res.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"uvicorn {module} did not answer") from None
                time.sleep(0.05)
        yield app
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout:
            proc.stdout.close()


def _sql(dsn: str, query: str, *args: Any) -> Any:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(query, args).fetchall()


def _final(body: dict[str, Any]) -> bool:
    return body["status"] in ("completed", "failed", "canceled")


def test_typed_jobs_dispatch_in_the_request_transaction(migrated_dsn: str) -> None:
    with serve("jobs_typed", migrated_dsn) as app:
        status, made = app.call("POST", "/signup", {"email": "ann@example.com", "name": "Ann"})
        assert status == 201, made
        ids = made["jobs"]
        email = app.until(f"/jobs/{ids['welcome_email']}", _final)
        assert email["status"] == "completed" and email["type"] == "signup.welcome_email"
        assert email["payload"] == {"to": "ann@example.com", "name": "Ann"}
        stats = app.until(f"/jobs/{ids['refresh_stats']}", _final)
        assert stats["result"] == {"users": 1, "new": 1} and stats["payload"] == [made["user_id"]]
        assert _sql(migrated_dsn, "SELECT body->>'to' FROM outbox") == [("ann@example.com",)]
        jobs_before = _sql(migrated_dsn, "SELECT count(*) FROM batchloop.jobs")[0][0]
        # The email is taken: the request's transaction rolls back, and no job exists.
        status, _ = app.call("POST", "/signup", {"email": "ann@example.com", "name": "Again"})
        assert status == 409
        # A payload that does not validate: 422 and nothing created (user row included).
        status, _ = app.call("POST", "/signup", {"email": "not-an-email", "name": "Bob"})
        assert status == 422
        status, _ = app.call(
            "POST", "/signup", {"email": "cy@example.com", "name": "Cy", "thumbnail_size": 5}
        )
        assert status == 422  # the third job's payload failed after two dispatches: all undone
        assert _sql(migrated_dsn, "SELECT count(*) FROM batchloop.jobs")[0][0] == jobs_before
        assert _sql(migrated_dsn, "SELECT email FROM users") == [("ann@example.com",)]
        status, made = app.call(
            "POST", "/signup", {"email": "cy@example.com", "name": "Cy", "thumbnail_size": 64}
        )
        assert status == 201
        thumb = app.until(f"/jobs/{made['jobs']['thumbnail']}", _final)
        assert thumb["status"] == "completed" and thumb["result"]["size"] == 64


def test_progress_polling_and_cancel(migrated_dsn: str) -> None:
    with serve("jobs_progress", migrated_dsn) as app:
        status, quick = app.call("POST", "/reports", {"rows": 4, "seconds_per_row": 0.01})
        assert status == 202
        done = app.until(f"/reports/{quick['id']}", _final)
        assert done["status"] == "completed" and done["progress"] == 100
        assert done["result"] == {"rows": 4, "sum": 6}

        status, slow = app.call("POST", "/reports", {"rows": 10_000, "seconds_per_row": 0.01})
        assert status == 202
        path = f"/reports/{slow['id']}"
        seen = app.until(path, lambda b: b["status"] == "running" and b["progress"] >= 1)
        assert seen["progress"] < 100
        # Cancel from another request; the handler sees it and stops; the job ends canceled.
        status, after = app.call("POST", f"{path}/cancel")
        assert status == 200, after
        ended = app.until(path, _final)
        assert ended["status"] == "canceled" and ended["progress"] < 100
        assert ended["result"] is None
        status, again = app.call("POST", f"{path}/cancel")
        assert status == 409 and "canceled" in again["detail"]
        status, _ = app.call("POST", f"/reports/{quick['id']}/cancel")
        assert status == 409  # a completed report cannot be canceled
        assert app.call("GET", "/reports/999999")[0] == 404
        assert app.call("POST", "/reports", {"rows": 0})[0] == 422


def test_payment_retries_never_charge_twice(migrated_dsn: str) -> None:
    with serve("jobs_payment", migrated_dsn) as app:
        status, order = app.call("POST", "/orders", {"amount_cents": 1250})
        assert status == 201
        oid = order["id"]
        # The provider takes the money, then times out twice: the job retries (attempt 3
        # succeeds) and every attempt sends the same idempotency key.
        status, first = app.call("POST", f"/orders/{oid}/pay", {"timeouts_after_charge": 2})
        assert status == 202
        status, second = app.call("POST", f"/orders/{oid}/pay", {"timeouts_after_charge": 2})
        assert status == 202 and second["job_id"] == first["job_id"]  # one job per order
        paid = app.until(f"/orders/{oid}", lambda b: b["status"] not in ("new", "paying"))
        assert paid["status"] == "paid", paid
        assert paid["job_status"] == "completed" and paid["attempts"] == 3
        assert paid["provider_charges"] == 1
        rows = _sql(
            migrated_dsn,
            "SELECT charge_id, calls, amount_cents FROM provider_charges"
            " WHERE idempotency_key = %s",
            f"charge:{oid}",
        )
        assert rows == [(paid["charge_id"], 3, 1250)]  # three calls, one charge
        # A declined card: NonRetryable, one attempt, no charge, the order failed.
        status, big = app.call("POST", "/orders", {"amount_cents": 500_000})
        app.call("POST", f"/orders/{big['id']}/pay")
        declined = app.until(f"/orders/{big['id']}", lambda b: b["status"] not in ("new", "paying"))
        assert declined["status"] == "failed" and declined["attempts"] == 1
        assert "card declined" in declined["error"] and declined["provider_charges"] == 0
        assert app.call("POST", "/orders/999999/pay")[0] == 404
