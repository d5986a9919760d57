"""Recipe: a transactional outbox delivering webhooks, at least once.

    DATABASE_URL=postgresql://user@localhost/mydb python -m examples.recipes.outbox

The application writes the event it must announce into ``webhook_outbox`` *in the transaction
that makes it true* (an order is paid: the order row and its outbox row commit together, or
neither does), and pings ``webhooks`` there. The worker POSTs each row to its endpoint:

* **at least once**: a row is marked delivered in the batch's transaction, after the endpoint
  answered 2xx. If that transaction rolls back (a crash, a lost connection) the POST is sent
  again, so every request carries an ``Idempotency-Key`` header (the row's key, stable across
  attempts) for the receiver to drop duplicates by;
* **retries with backoff**: a failed POST (5xx, refused, timeout) is retried after
  ``BACKOFF_BASE * 2**(attempts - 1)`` seconds with jitter, capped at ``BACKOFF_CAP``; after
  ``MAX_ATTEMPTS`` the row is ``dead`` (visible, kept, never retried); a 4xx other than 429 is
  dead at once (sending it again will not help);
* **slowing down**: when an endpoint answers 429 (or 503) with ``Retry-After``, the worker stops
  the pass and returns :class:`batchloop.Debounce` for that long: the loop does not run, and
  pings are ignored, until then; the rows it did not send stay pending.

The work query returns the pending rows whose ``next_attempt_at`` has come, or
``Idle(timeout=...)`` until the earliest retry, or ``Idle()`` when there is nothing left.

The POSTs run inside the batch's transaction, which stays open meanwhile: keep ``BATCH`` times
``TIMEOUT`` modest (and under the name's ``Config(iteration_timeout=...)``, if you set one).

Needs ``httpx`` (``pip install httpx``).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

import batchloop as bl

from ._common import dsn_from_env

log = logging.getLogger(__name__)

NAME = "webhooks"
BATCH = 20
MAX_ATTEMPTS = 8
BACKOFF_BASE = 1.0
"""Seconds before the first retry; doubled for each further one."""
BACKOFF_CAP = 600.0
RETRY_AFTER_CAP = 3600.0
"""The longest Retry-After obeyed; a longer one (or a bad value) is capped."""
DEFAULT_SLOW_DOWN = 30.0
"""Seconds to wait after a 429 or 503 that gives no usable Retry-After."""
TIMEOUT = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id bigserial PRIMARY KEY,
    idempotency_key uuid NOT NULL UNIQUE DEFAULT gen_random_uuid(),
    endpoint text NOT NULL,
    payload jsonb NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error text,
    created_at timestamptz NOT NULL DEFAULT now(),
    delivered_at timestamptz
);
CREATE INDEX IF NOT EXISTS webhook_outbox_pending ON webhook_outbox (next_attempt_at, id)
    WHERE status = 'pending';
"""

DUE = """
SELECT id FROM webhook_outbox
WHERE status = 'pending' AND next_attempt_at <= now()
ORDER BY next_attempt_at, id LIMIT $1
"""
NEXT_IN = """
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8 FROM webhook_outbox
WHERE status = 'pending'
"""


async def create_tables(conn: Any) -> None:
    await conn.execute(SCHEMA)


async def enqueue(conn: Any, endpoint: str, payload: Any) -> str:
    """Add a webhook to the outbox in the caller's transaction (ping included); returns its
    idempotency key."""
    key = await conn.fetchval(
        "INSERT INTO webhook_outbox (endpoint, payload) VALUES ($1, $2::jsonb) "
        "RETURNING idempotency_key::text",
        endpoint,
        json.dumps(payload),
    )
    await bl.ping(conn, NAME, due_webhooks, send_webhooks)
    return str(key)


@bl.work_query
async def due_webhooks(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    ids = [r["id"] for r in await conn.fetch(DUE, BATCH)]
    if ids:
        return bl.Work(ids)
    next_in = await conn.fetchval(NEXT_IN)
    return bl.Idle() if next_in is None else bl.Idle(timeout=max(0.0, next_in))


def backoff(attempts: int) -> float:
    """Seconds before retry number ``attempts``: exponential, capped, with full jitter on the
    upper half so that rows failing together do not retry together."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (attempts - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def retry_after(value: str | None) -> float:
    """A ``Retry-After`` header (seconds, or an HTTP date) as seconds from now."""
    if value:
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return DEFAULT_SLOW_DOWN
            if when.tzinfo is None:
                when = when.replace(tzinfo=timezone.utc)
            seconds = (when - datetime.now(timezone.utc)).total_seconds()
        if seconds == seconds:  # not NaN
            return min(max(seconds, 0.0), RETRY_AFTER_CAP)
    return DEFAULT_SLOW_DOWN


@bl.worker
async def send_webhooks(conn: Any, batch: list[int]) -> bl.Debounce | None:
    rows = await conn.fetch(
        "SELECT id, idempotency_key::text AS key, endpoint, payload::text AS body, attempts "
        "FROM webhook_outbox WHERE id = ANY($1) AND status = 'pending' ORDER BY id",
        batch,
    )
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for row in rows:
            try:
                response = await client.post(
                    row["endpoint"],
                    content=row["body"],
                    headers={
                        "Content-Type": "application/json",
                        "Idempotency-Key": row["key"],
                    },
                )
            except httpx.HTTPError as exc:
                await failed(conn, row, f"{type(exc).__name__}: {exc}")
                continue
            if response.is_success:
                await conn.execute(
                    "UPDATE webhook_outbox SET status = 'delivered', delivered_at = now(), "
                    "attempts = attempts + 1, last_error = NULL WHERE id = $1",
                    row["id"],
                )
            elif response.status_code in (429, 503):
                # The endpoint asks us to slow down: this row is not its fault, so it costs no
                # attempt; nothing more is sent (to any endpoint: one name, one pace) until then.
                pause = retry_after(response.headers.get("retry-after"))
                log.info("webhooks: %s says slow down for %.1f s", row["endpoint"], pause)
                # A Debounce counts from the batch's start (the transaction's now()): add the
                # time this batch has taken so far, so the pause counts from the answer.
                taken = await conn.fetchval(
                    "SELECT extract(epoch FROM clock_timestamp() - now())::float8"
                )
                return bl.Debounce(pause + max(taken, 0.0))  # pause <= RETRY_AFTER_CAP
            elif 400 <= response.status_code < 500:
                await failed(conn, row, f"HTTP {response.status_code}", dead=True)
            else:
                await failed(conn, row, f"HTTP {response.status_code}")
    return None


async def failed(conn: Any, row: Any, error: str, *, dead: bool = False) -> None:
    attempts = row["attempts"] + 1
    dead = dead or attempts >= MAX_ATTEMPTS
    await conn.execute(
        "UPDATE webhook_outbox SET attempts = $2, last_error = $3, "
        "status = CASE WHEN $4 THEN 'dead' ELSE 'pending' END, "
        "next_attempt_at = now() + make_interval(secs => $5) WHERE id = $1",
        row["id"],
        attempts,
        error,
        dead,
        0.0 if dead else backoff(attempts),
    )
    suffix = " (dead)" if dead else ""
    log.warning("webhook %s attempt %d failed: %s%s", row["key"], attempts, error, suffix)


class Receiver:
    """A webhook endpoint for the demo and the test: a real HTTP server on 127.0.0.1 that keeps
    what it accepted by idempotency key (a duplicate is acknowledged and dropped), and can be
    told to fail or to ask for a slow-down."""

    def __init__(self) -> None:
        self.accepted: dict[str, Any] = {}
        self.requests: list[tuple[float, str, int]] = []
        """(monotonic time, key, status answered) for every request."""
        self.fail_first: dict[str, int] = {}
        """key -> how many requests with it to answer 500 before accepting."""
        self.slow_down_once: float | None = None
        """Answer the next request 429 with this Retry-After (seconds)."""
        self.quiet_until = 0.0
        self.early = 0
        """Requests that arrived while the endpoint had asked for quiet."""
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/hook":
                    key = self.headers.get("Idempotency-Key", "")
                    status, headers = receiver.answer(key, body)
                else:
                    status, headers = 404, {}
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, key: str, body: bytes) -> tuple[int, dict[str, str]]:
        with self.lock:
            now = time.monotonic()
            if now < self.quiet_until:
                self.early += 1
                status, headers = 429, {"Retry-After": "1"}
            elif self.slow_down_once is not None:
                seconds, self.slow_down_once = self.slow_down_once, None
                # A margin for the two clocks (the database's and ours) and rounding.
                self.quiet_until = now + seconds * 0.8
                status, headers = 429, {"Retry-After": f"{seconds:g}"}
            elif self.fail_first.get(key, 0) > 0:
                self.fail_first[key] -= 1
                status, headers = 500, {}
            else:
                self.accepted.setdefault(key, json.loads(body))  # a duplicate changes nothing
                status, headers = 200, {}
            self.requests.append((now, key, status))
            return status, headers

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


async def main(dsn: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    global BACKOFF_BASE
    BACKOFF_BASE = 0.2  # a quick demo
    await bl.migrate(dsn)
    with Receiver() as receiver:
        async with bl.Host(dsn) as host, host.pool.acquire() as conn:
            await create_tables(conn)
            async with conn.transaction():  # e.g. with the order that was just paid
                keys = [await enqueue(conn, receiver.url, {"order": n}) for n in range(1, 6)]
                receiver.fail_first[keys[0]] = 2  # the first one fails twice, then succeeds
            for _ in range(200):
                if len(receiver.accepted) == len(keys):
                    break
                await asyncio.sleep(0.05)
    sent, accepted = len(receiver.requests), len(receiver.accepted)
    print(f"{accepted} of {len(keys)} webhooks accepted after {sent} requests")


if __name__ == "__main__":
    asyncio.run(main(dsn_from_env("outbox")))
