"""Shared pieces of the benchmark scripts: host processes, their callables, databases, meters.

A host process is ``python bench/hosts.py host DSN [knobs]``: a ``batchloop.Host`` serving the
callables below (registered as ``hosts:bench_query`` / ``hosts:bench_worker``). It prints
``ready <host_id> <pid>``, then, with ``--echo``, one ``batch ...`` line per committed-to-be
batch, and a ``stats {...}`` JSON line on SIGUSR1; SIGTERM makes it leave cleanly.

``python bench/hosts.py listener DSN`` is the NOTIFY baseline of ``latency.py``: a plain
asyncpg LISTEN connection plus a second connection that, on every notification, runs the same
first work query a loop would; it prints ``base <seq> <t_notify> <t_query_done>``.

Timestamps are ``time.monotonic()``: on Linux that is ``CLOCK_MONOTONIC``, one kernel clock
shared by every process on the machine (not a per-process clock), so a producer's commit and a
host's worker start in another process are compared on the same clock with no round trip in
between. The scripts run everything on one machine; they refuse a remote server for latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

import batchloop as bl

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"

TABLES = """
CREATE TABLE bench_items (id bigserial PRIMARY KEY, name text NOT NULL);
CREATE INDEX ON bench_items (name, id);
CREATE TABLE bench_done (
    name text NOT NULL, first_item bigint NOT NULL, items int NOT NULL, host_pid int NOT NULL,
    generation bigint NOT NULL, q_mono float8, w_mono float8 NOT NULL, n_mono float8,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ON bench_done (name, at);
"""

# ---------------------------------------------------------------------------- host-side knobs
# Set from the host process's command line; the producer side never runs the callables.
LIMIT = 100
SLEEP = 0.0
IDLE = bl.Idle()
ECHO = False
LAST_NOTIFY: dict[str, float] = {}
"""Monotonic arrival time of the last wake-up notification per name (latency breakdown)."""


@bl.work_query
async def bench_query(conn: Any, name: str) -> bl.Work[dict[str, Any]] | bl.Idle:
    started = time.monotonic()
    rows = await conn.fetch(
        "SELECT id FROM bench_items WHERE name = $1 ORDER BY id LIMIT $2", name, LIMIT
    )
    if not rows:
        return IDLE
    return bl.Work(
        {"name": name, "ids": [r["id"] for r in rows], "q": started, "n": LAST_NOTIFY.get(name)}
    )


@bl.worker
async def bench_worker(conn: Any, batch):  # type: ignore[no-untyped-def]  # unannotated: no validation cost
    started = time.monotonic()
    name = batch["name"]
    await conn.execute(
        """
        WITH d AS (DELETE FROM bench_items WHERE id = ANY($1::bigint[]) RETURNING id)
        INSERT INTO bench_done (name, first_item, items, host_pid, generation, q_mono, w_mono,
                                n_mono)
        SELECT $2, min(id), count(*), $3,
               (SELECT generation FROM batchloop.worker_state WHERE name = $2), $4, $5, $6
          FROM d HAVING count(*) > 0
        """,
        batch["ids"],
        name,
        os.getpid(),
        batch["q"],
        started,
        batch["n"],
    )
    if ECHO:
        print(
            f"batch {name} {min(batch['ids'])} {len(batch['ids'])} {batch['q']!r} {started!r} "
            f"{batch['n']!r}",
            flush=True,
        )
    if SLEEP:
        await asyncio.sleep(SLEEP)


async def ping_items(conn: Any, name: str, count: int = 1) -> tuple[int, str]:
    """Insert ``count`` items for ``name`` and ping, in one transaction; (first id, ping result)."""
    async with conn.transaction():
        first = await conn.fetchval(
            "INSERT INTO bench_items (name) SELECT $1 FROM generate_series(1, $2) RETURNING id",
            name,
            count,
        )
        result = await bl.ping(conn, name, bench_query, bench_worker)
    return int(first), result


# ---------------------------------------------------------------------------- host process

STATEMENTS = 0
KINDS: dict[str, int] = {}
"""Statements by what they are for (:func:`kind`), for ``many_names``' breakdown."""

_KINDS = (
    ("claim_many(", "claim or release (claim_many)"),
    ("BEGIN", "iteration start (BEGIN + book_batch)"),
    ("pg_try_advisory_xact_lock(wake_key)", "try_go_idle"),
    ("status = 'idle'", "go_idle"),
    ("status = 'waiting'", "go_waiting"),
    ("batches = batches - 1", "poll end (unbook_batch + COMMIT)"),
    ("COMMIT", "batch end (COMMIT)"),
    ("DELETE FROM bench_items", "worker (user SQL)"),
    ("bench_items", "work query (user SQL)"),
    ("RESET ALL", "pool reset on release"),
    ("heartbeat", "heartbeat"),
    ("orphans", "monitor"),
)


def kind(text: str) -> str:
    """Which step of batchloop's a statement belongs to (by its text)."""
    return next((label for marker, label in _KINDS if marker in text), "other")


class CountingConnection(asyncpg.Connection):  # type: ignore[misc]
    """Counts every statement (round trip) the host sends, for ``idle_cost``/``many_names``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_query_logger(_count)


def _count(record: Any) -> None:
    global STATEMENTS
    STATEMENTS += 1
    label = kind(str(getattr(record, "query", "")))
    KINDS[label] = KINDS.get(label, 0) + 1


class TracingConnection(asyncpg.Connection):  # type: ignore[misc]
    """Prints every statement the host sends: ``trace <start> <elapsed> <backend> <text>``
    (monotonic seconds, stamped around the awaited call)."""

    def _emit(self, started: float, query: Any) -> None:
        elapsed = time.monotonic() - started
        text = " ".join(str(query).split())[:70]
        print(f"trace {started!r} {elapsed!r} {self.get_server_pid()} {text}", flush=True)

    async def execute(self, query: str, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await super().execute(query, *args, **kwargs)
        finally:
            self._emit(started, query)

    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await super().fetch(query, *args, **kwargs)
        finally:
            self._emit(started, query)

    async def fetchrow(self, query: str, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await super().fetchrow(query, *args, **kwargs)
        finally:
            self._emit(started, query)

    async def fetchval(self, query: str, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return await super().fetchval(query, *args, **kwargs)
        finally:
            self._emit(started, query)


def _deaf() -> None:
    """Make hosts in this process skip LISTEN: wake-ups then reach them only through the
    monitor query. batchloop has no switch for it; this swaps the control connection class
    the control session module builds for one whose ``listen`` does nothing."""
    import batchloop.runtime.session as session_module
    from batchloop.runtime.session import Control

    if not hasattr(session_module, "Sessions"):
        raise RuntimeError(
            "batchloop.runtime.session no longer builds a Control: update bench/hosts.py"
        )

    class DeafControl(Control):
        async def listen(self, callback: Any) -> None:
            return None

    session_module.Control = DeafControl  # type: ignore[misc]


class StampingHost(bl.Host):
    """A Host that notes when each wake-up notification arrives (for the latency breakdown)."""

    def _on_notify(self, payload: str) -> None:
        name = payload.split(":", 2)[-1]
        LAST_NOTIFY[name] = time.monotonic()
        super()._on_notify(payload)


async def _host(args: argparse.Namespace) -> None:
    global LIMIT, SLEEP, IDLE, ECHO
    LIMIT, SLEEP, ECHO = args.limit, args.sleep, args.echo
    IDLE = bl.Idle(cooldown=args.cooldown, poll_interval=args.poll)
    if args.no_listen:
        _deaf()
    kwargs: dict[str, Any] = {"monitor_interval": args.monitor_interval}
    if args.pool_max is not None:
        kwargs["pool_max_size"] = args.pool_max
    if args.count:
        kwargs["connect_kwargs"] = {"connection_class": CountingConnection}
    if args.trace:
        kwargs["connect_kwargs"] = {"connection_class": TracingConnection}
    cls = StampingHost if hasattr(bl.Host, "_on_notify") else bl.Host
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with cls(args.dsn, modules=["hosts"], **kwargs) as host:

        def stats() -> None:
            line = {
                "pid": os.getpid(),
                "statements": STATEMENTS,
                "kinds": dict(KINDS),
                "owned": len(host.owned()),
            }
            print("stats", json.dumps(line), flush=True)

        loop.add_signal_handler(signal.SIGUSR1, stats)
        print("ready", host.host_id, os.getpid(), flush=True)
        await stop.wait()


async def _listener(dsn: str, channel: str) -> None:
    """The baselines: NOTIFY arrival, then the first work query on another connection."""
    listen = await asyncpg.connect(dsn)
    work = await asyncpg.connect(dsn)
    query = "SELECT id FROM bench_items WHERE name = $1 ORDER BY id LIMIT $2"
    await work.fetch(query, "baseline", LIMIT)  # prepare it, as a warm pool connection has
    busy = asyncio.Lock()

    async def handle(seq: str, t_notify: float) -> None:
        async with busy:
            await work.fetch(query, "baseline", LIMIT)
            t_query = time.monotonic()
        print(f"base {seq} {t_notify!r} {t_query!r}", flush=True)

    def on_notify(_c: Any, _pid: int, _channel: str, payload: str) -> None:
        t = time.monotonic()
        asyncio.get_running_loop().create_task(handle(payload, t))

    await listen.add_listener(channel, on_notify)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready listener", os.getpid(), flush=True)
    await stop.wait()
    await listen.close()
    await work.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="bench host or NOTIFY-baseline process")
    sub = parser.add_subparsers(dest="role", required=True)
    h = sub.add_parser("host")
    h.add_argument("dsn")
    h.add_argument("--cooldown", type=float, default=2.0)
    h.add_argument("--poll", type=float, default=0.2)
    h.add_argument("--limit", type=int, default=100)
    h.add_argument("--sleep", type=float, default=0.0)
    h.add_argument("--monitor-interval", type=float, default=0.5)
    h.add_argument("--pool-max", type=int, default=None)
    h.add_argument("--no-listen", action="store_true")
    h.add_argument("--echo", action="store_true")
    h.add_argument("--count", action="store_true")
    h.add_argument("--trace", action="store_true")
    li = sub.add_parser("listener")
    li.add_argument("dsn")
    li.add_argument("--channel", default="bench_baseline")
    args = parser.parse_args(argv)
    if args.role == "host":
        asyncio.run(_host(args))
    else:
        asyncio.run(_listener(args.dsn, args.channel))


# ---------------------------------------------------------------------------- bench side


@dataclass
class Proc:
    """One child process (host or listener) and what it printed."""

    proc: asyncio.subprocess.Process
    pid: int
    host_id: str | None
    lines: asyncio.Queue[str] = field(default_factory=asyncio.Queue)
    stats: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    reader: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None


class Fleet:
    """Child processes of one benchmark: spawn, signal, collect, and always clean up."""

    def __init__(self, dsn: str, *, verbose: bool = False) -> None:
        self.dsn = dsn
        self.verbose = verbose
        self.procs: dict[int, Proc] = {}

    async def spawn(
        self, role: str = "host", *extra: str, env: dict[str, str] | None = None
    ) -> Proc:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH / "hosts.py"),
            role,
            self.dsn,
            *extra,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=None if self.verbose else subprocess.DEVNULL,
            cwd=str(BENCH),
            env={**os.environ, **(env or {})},
        )
        assert proc.stdout is not None
        try:
            line = "trace"
            while line.startswith("trace"):  # a tracing host traces its start-up too
                line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        except BaseException:
            proc.kill()
            await proc.wait()
            raise
        if not line.startswith("ready"):
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"{role} process failed to start: {line!r} (run with --verbose)")
        parts = line.split()
        p = Proc(proc, proc.pid, parts[1] if role == "host" else None)
        p.reader = asyncio.create_task(self._read(p))
        self.procs[p.pid] = p
        return p

    async def _read(self, p: Proc) -> None:
        assert p.proc.stdout is not None
        while True:
            raw = await p.proc.stdout.readline()
            if not raw:
                return
            line = raw.decode().rstrip("\n")
            if line.startswith("stats "):
                p.stats.put_nowait(json.loads(line[6:]))
            else:
                p.lines.put_nowait(line)

    def hosts(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.host_id is not None and p.alive]

    async def signal_stats(self, p: Proc, timeout: float = 10.0) -> dict[str, Any]:
        p.proc.send_signal(signal.SIGUSR1)
        return await asyncio.wait_for(p.stats.get(), timeout)

    async def kill(self, p: Proc) -> None:
        with contextlib.suppress(ProcessLookupError):
            p.proc.kill()
        await p.proc.wait()
        self.procs.pop(p.pid, None)

    async def stop(self, p: Proc, timeout: float = 20.0) -> None:
        """SIGTERM (a clean exit that releases its names), SIGKILL if it takes too long."""
        with contextlib.suppress(ProcessLookupError):
            p.proc.send_signal(signal.SIGCONT)
            p.proc.terminate()
        try:
            await asyncio.wait_for(p.proc.wait(), timeout)
        except asyncio.TimeoutError:
            await self.kill(p)
        self.procs.pop(p.pid, None)

    async def close(self) -> None:
        await asyncio.gather(*(self.stop(p) for p in list(self.procs.values())))


def host_args(
    *,
    cooldown: float = 2.0,
    poll: float = 0.2,
    limit: int = 100,
    sleep: float = 0.0,
    monitor_interval: float = 0.5,
    pool_max: int | None = None,
    no_listen: bool = False,
    echo: bool = False,
    count: bool = False,
    trace: bool = False,
) -> list[str]:
    args = [
        f"--cooldown={cooldown}",
        f"--poll={poll}",
        f"--limit={limit}",
        f"--sleep={sleep}",
        f"--monitor-interval={monitor_interval}",
    ]
    if pool_max is not None:
        args.append(f"--pool-max={pool_max}")
    args += [
        flag
        for flag, on in (
            ("--no-listen", no_listen),
            ("--echo", echo),
            ("--count", count),
            ("--trace", trace),
        )
        if on
    ]
    return args


def default_admin_dsn() -> str:
    return os.environ.get("DATABASE_URL") or "postgresql://root@127.0.0.1:5432/postgres"


def with_database(dsn: str, dbname: str) -> str:
    """The URL ``dsn`` (same server, credentials and parameters) on database ``dbname``."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError("the benchmarks take a postgresql:// URL")
    query = f"?{parts.query}" if parts.query else ""
    return f"postgresql://{parts.netloc}/{dbname}{query}"


@contextlib.asynccontextmanager
async def bench_database(admin_dsn: str, label: str) -> AsyncIterator[str]:
    """A new database ``bench_<label>_<random>``, migrated, with the bench tables; dropped after."""
    name = f"bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(admin_dsn, name)
    try:
        await bl.migrate(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(TABLES)
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_walinspect")
                await conn.execute(WAL_FUNCTION)
        finally:
            await conn.close()
        yield dsn
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


# ---------------------------------------------------------------------------- measuring


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def dist(values: list[float], scale: float = 1000.0, digits: int = 3) -> dict[str, Any]:
    """n, p50, p95, p99, max (and mean), times ``scale`` (seconds to ms by default)."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(percentile(values, 50) * scale, digits),
        "p95": round(percentile(values, 95) * scale, digits),
        "p99": round(percentile(values, 99) * scale, digits),
        "max": round(max(values) * scale, digits),
        "mean": round(sum(values) / len(values) * scale, digits),
    }


WAL_FUNCTION = """
CREATE FUNCTION bench_wal_chunk(p_start text, p_end text, p_db oid, p_prev bigint[])
RETURNS TABLE (o_bytes bigint, o_records bigint, o_fpi_bytes bigint, o_xids bigint[],
               o_last_end text, o_kinds text)
LANGUAGE plpgsql AS $f$
BEGIN
    RETURN QUERY
    WITH m AS (
        SELECT r.xid::text::bigint AS xid, r.record_length, r.fpi_length, r.end_lsn,
               r.resource_manager || '/' || r.record_type AS kind,
               substring(r.block_ref FROM ' rel [0-9]+/[0-9]+/([0-9]+)')::oid AS filenode,
               coalesce(r.block_ref ~ (' rel [0-9]+/' || p_db || '/'), false) AS in_db
          FROM pg_get_wal_records_info(p_start::pg_lsn, p_end::pg_lsn) r
    ),
    x AS (SELECT coalesce(array_agg(DISTINCT m.xid), '{}') AS ids FROM m
           WHERE m.in_db AND m.xid <> 0),
    ours AS (
        SELECT m.* FROM m, x
         WHERE m.in_db OR (m.xid <> 0 AND (m.xid = ANY(p_prev) OR m.xid = ANY(x.ids)))
    )
    SELECT (SELECT coalesce(sum(o.record_length), 0) FROM ours o)::bigint,
           (SELECT count(*) FROM ours),
           (SELECT coalesce(sum(o.fpi_length), 0) FROM ours o)::bigint,
           (SELECT x.ids FROM x),
           (SELECT max(m.end_lsn)::text FROM m),
           (SELECT coalesce(jsonb_object_agg(
                       k.kind || coalesce(' ' || (SELECT c.relname FROM pg_class c
                                                   WHERE pg_relation_filenode(c.oid) = k.filenode
                                                   LIMIT 1), ''),
                       jsonb_build_array(k.n, k.b)), '{}')::text
              FROM (SELECT o.kind, o.filenode, count(*) AS n, sum(o.record_length) AS b
                      FROM ours o GROUP BY 1, 2) k);
EXCEPTION WHEN OTHERS THEN
    -- No complete record between the two positions yet. Caught here, not in the client: an
    -- error reaching the top level would also drop the session's temporary replication slot.
    -- The last chunk's final record can end past the current flush position ("future").
    IF SQLERRM LIKE 'could not find a valid record%'
       OR SQLERRM LIKE 'cannot accept future%' THEN
        RETURN;
    END IF;
    RAISE;
END $f$
"""
"""Installed in bench databases that have pg_walinspect (see WalMeter)."""


def lsn_int(lsn: str) -> int:
    """A ``pg_lsn`` in its text form (``16/B374D848``) as a byte position."""
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


class WalMeter:
    """WAL attributable to one database, read back with ``pg_walinspect`` (the shared server's
    other databases write WAL too, so the raw LSN advance is only an upper bound).

    Counts WAL records that touch a relation of this database, plus the other records (commits)
    of the transactions that did, between two flush positions, and also the raw cluster-wide
    advance. ``sample`` reads the WAL in chunks, so a checkpoint cannot recycle segments not yet
    read. Without the extension only the raw advance is known (``exact`` False).
    """

    def __init__(self, conn: Any, database: str | None = None) -> None:
        self.conn = conn
        self.database = database
        """The database to attribute WAL to (default: the connection's)."""
        self.exact = False
        self.lsn: str | None = None
        self.bytes = self.records = self.fpi_bytes = self.cluster_bytes = 0
        self._xids: set[int] = set()
        self._oid: int | None = None
        self._slot: str | None = None
        self._lsn0: str | None = None
        self.kinds: dict[str, list[int]] = {}
        """[records, bytes] attributed to the database, by resource manager, record type and
        relation."""

    async def start(self) -> WalMeter:
        self.exact = bool(
            await self.conn.fetchval(
                "SELECT to_regprocedure('bench_wal_chunk(text, text, oid, bigint[])') IS NOT NULL"
            )
        )
        self._oid = await self.conn.fetchval(
            "SELECT oid FROM pg_database WHERE datname = coalesce($1, current_database())",
            self.database,
        )
        if self.exact and self._slot is None:
            # Checkpoints (frequent on a busy shared server) recycle WAL segments within
            # seconds; a temporary slot keeps them until read. It is the session's: it goes
            # when this connection closes, whatever happens to this process.
            self._slot = f"bench_wal_{uuid.uuid4().hex[:12]}"
            try:
                await self.conn.execute(
                    "SELECT pg_create_physical_replication_slot($1, true, true)", self._slot
                )
            except asyncpg.PostgresError:
                self._slot = None
                self.exact = False
        # The insert position: everything written before start() is excluded (and it is a
        # record boundary).
        self.lsn = self._lsn0 = await self.conn.fetchval("SELECT pg_current_wal_insert_lsn()::text")
        self.bytes = self.records = self.fpi_bytes = self.cluster_bytes = 0
        self._xids = set()
        self.kinds = {}
        return self

    async def sample(self, final: bool = False) -> None:
        """Account for the WAL flushed since the last call. The next chunk starts where the
        last complete record read ended (a flush position can fall inside a record, which then
        counts in the next chunk). ``final``: retry until the last records are readable."""
        assert self.lsn is not None and self._lsn0 is not None
        row = None
        for attempt in range(100 if final else 1):
            end = await self.conn.fetchval("SELECT pg_current_wal_flush_lsn()::text")
            # The flush position can lag the insert position start() read (a busy server's
            # WAL writer has not caught up yet): nothing of ours is readable then, and asking
            # pg_walinspect for a backwards range is an error that would drop the slot.
            self.cluster_bytes = max(0, lsn_int(end) - lsn_int(self._lsn0))
            if not self.exact:
                self.lsn = end
                return
            if lsn_int(end) > lsn_int(self.lsn):
                row = await self.conn.fetchrow(
                    "SELECT * FROM bench_wal_chunk($1, $2, $3, $4)",
                    self.lsn,
                    end,
                    self._oid,
                    list(self._xids),
                )
                if row is not None and row["o_last_end"] is not None:
                    break
            elif lsn_int(end) == lsn_int(self.lsn):
                return  # flushed exactly up to where we are: nothing new
            if attempt < 99 and final:
                await asyncio.sleep(0.02)
        if row is None or row["o_last_end"] is None:
            return
        self.bytes += int(row["o_bytes"])
        self.records += int(row["o_records"])
        self.fpi_bytes += int(row["o_fpi_bytes"])
        self._xids.update(int(x) for x in row["o_xids"])
        for kind, (n, size) in json.loads(row["o_kinds"]).items():
            was = self.kinds.get(kind, [0, 0])
            self.kinds[kind] = [was[0] + int(n), was[1] + int(size)]
        self.lsn = row["o_last_end"]
        if self._slot is not None:
            await self.conn.execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)", self._slot, self.lsn
            )

    async def close(self) -> None:
        """Drop the slot (closing the connection drops it too)."""
        if self._slot is not None:
            with contextlib.suppress(asyncpg.PostgresError):
                await self.conn.execute("SELECT pg_drop_replication_slot($1)", self._slot)
            self._slot = None

    def result(self) -> dict[str, Any]:
        return {
            "exact": self.exact,
            "db_bytes": self.bytes if self.exact else None,
            "db_records": self.records if self.exact else None,
            "db_fpi_bytes": self.fpi_bytes if self.exact else None,
            "db_record_kinds": dict(sorted(self.kinds.items())) if self.exact else None,
            "cluster_bytes": self.cluster_bytes,
        }


DB_COUNTERS = (
    "xact_commit",
    "xact_rollback",
    "tup_returned",
    "tup_fetched",
    "tup_inserted",
    "tup_updated",
    "tup_deleted",
    "blks_hit",
    "blks_read",
)


async def db_counters(conn: Any, database: str | None = None) -> dict[str, int]:
    """A database's cumulative pg_stat_database counters (default: the connection's).

    This backend's own pending counts are flushed first (PostgreSQL 15+); other backends flush
    theirs at the end of a transaction at most once a second, or after 10 s idle.
    """
    with contextlib.suppress(asyncpg.PostgresError):
        await conn.execute("SELECT pg_stat_force_next_flush()")
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    row = await conn.fetchrow(
        f"SELECT {', '.join(DB_COUNTERS)} FROM pg_stat_database"
        " WHERE datname = coalesce($1, current_database())",
        database,
    )
    return {k: int(row[k]) for k in DB_COUNTERS}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after}


def provenance() -> dict[str, Any]:
    """Which batchloop was measured: its path, and the checkout's commit and local changes."""
    src = Path(bl.__file__).resolve().parent.parent
    info: dict[str, Any] = {"batchloop": str(src), "python": sys.version.split()[0]}
    with contextlib.suppress(Exception):
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=src,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "batchloop", "migrations"],
            cwd=src,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["library_modified"] = bool(dirty)
    stamp = src / "COMMIT"  # a snapshot (git archive) of a commit, named in this file
    if "commit" not in info and stamp.exists():
        info["commit"] = stamp.read_text().strip()
        info["library_modified"] = False
    info["cpus"] = os.cpu_count()
    return info


def write_result(kind: str, summary: dict[str, Any], out: Path | None = None) -> Path:
    out = out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    return path


def output_options(parser: argparse.ArgumentParser) -> None:
    """The options every multi-host scenario shares: where results go and how much it says."""
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--verbose", action="store_true", help="show the hosts' stderr")
    parser.add_argument("--quiet", action="store_true")


def say(args: argparse.Namespace) -> Callable[..., None]:
    """Progress printing, silenced by ``--quiet``."""
    return (lambda *_: None) if args.quiet else print


def report(
    kind: str,
    summary: dict[str, Any],
    argv: list[str] | None,
    out: Path | None,
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """The end of every scenario's ``main``: note the command, write the JSON, print the table."""
    summary["command"] = " ".join(
        ["python", f"bench/{kind}.py", *(sys.argv[1:] if argv is None else argv)]
    )
    path = write_result(kind, summary, out)
    print(markdown(summary))
    print(f"(written to {path})")


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    import hosts  # the callables must register as "hosts:...", not "__main__:..."

    hosts.main()
