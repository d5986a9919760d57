"""Drain benchmark: how fast each system empties a backlog of pre-inserted rows.

    python bench/drain.py                                   # the full run (defaults below)
    python bench/drain.py --rows 2000 --runs 1 --batches 1,100 --batch1-rows 500   # quick
    python bench/drain.py --report bench/results/drain-*.json   # reprint a saved run's tables
    python bench/chart.py bench/results/drain-*.json           # -> docs/benchmarks-drain.png

Every trial gets a brand-new database ``bench_drain_*`` on the server of ``--dsn`` (default
``DATABASE_URL``, else ``postgresql://127.0.0.1:5432/postgres``), filled with N rows or jobs,
VACUUM ANALYZEd and CHECKPOINTed, then drained until empty by the system under test in a
subprocess of its own (so no system inherits another's event loop, pools or garbage); the
database is dropped afterwards. Throughput is N / drain time; filling (for the peers: their
enqueue) is timed apart and never counted. Trials alternate systems within each round
(raw, batchloop, ..., then the next batch size; then the next round), and the report gives the
median, min and max per system and batch size, and the ratio of medians to the raw loop run by
the same invocation (for the ``-cursor`` variants: to ``raw-cursor``, the same SQL).

Systems:

* ``raw``: a hand-written asyncpg loop on one connection; each batch is one explicit
  transaction: ``SELECT id FROM items ORDER BY id LIMIT $1`` then
  ``DELETE FROM items WHERE id = ANY($1::bigint[])``; it stops at the first empty SELECT.
* ``raw-cursor``: the same with ``WHERE id > $2`` (the last id deleted) in the SELECT, so it
  never walks the dead index entries that the deletes leave at the head of the index.
* ``batchloop``: a ``batchloop.Host`` (asyncpg driver) running one name whose module-level
  ``@work_query`` runs the raw SELECT and whose ``@worker`` (``batch: list[int]``, as in the
  README) runs the raw DELETE, one transaction per batch with batchloop's own bookkeeping. The
  clock starts when the transaction that pings the (new) name commits and stops when the work
  query first finds nothing (it then returns ``Idle(cooldown=0)``): the same end point as raw.
* ``raw-psycopg``: the ``raw`` loop written with psycopg 3 (``%s`` parameters, psycopg's
  default of preparing a statement after its fifth run), to show what the client library
  itself costs.
* ``batchloop-psycopg``: a ``Host(driver="psycopg")``: the same work query and worker written
  for the ``psycopg.AsyncConnection`` they are given.
* ``batchloop-cursor``: the same with the cursor SELECT. The last id lives in a module-level
  variable the worker sets after its DELETE: fine for a benchmark (one name per process, no
  failures; the final emptiness check would catch a skipped row), not how to keep a cursor in
  production (keep it in a table, written in the batch's transaction).
* ``batchloop-observed``: ``batchloop`` with every observer on: ``batchloop.observe.metrics.
  Metrics`` registered and an OpenTelemetry SDK tracer provider (``BatchSpanProcessor`` into an
  in-memory exporter), so each iteration makes one span. Its ratio is to ``batchloop`` (the
  same run): the cost of metrics and tracing. ``batchloop-observed-callables`` adds the work
  query's and the worker's spans (``tracing.use(provider, callables=True)``): three spans an
  iteration. ``batchloop-metrics`` has the metrics alone. Not in the default systems; e.g.
  ``python bench/drain.py --systems batchloop,batchloop-metrics,batchloop-observed,
  batchloop-observed-callables --batches 100 --runs 15``.
* ``pgqueuer``, ``procrastinate``: N no-op jobs drained by the queue's own worker, tuned per its
  documentation for throughput; see ``bench/peers/`` for exactly how, and the JSON for the
  settings of each trial.

Batch size 1 runs ``--batch1-rows`` rows (one transaction per row is slow for everyone), and
``--cap SYSTEM=N`` caps a slow system's rows (by default procrastinate drains 10,000 jobs):
throughput is per row either way, but the report says how many rows each figure drained.

``--profile DIR`` runs each trial under pyinstrument (wall clock, so time spent waiting for the
server shows as ``select``) and writes ``DIR/profile-<system>-<batch>.txt``, e.g.
``python bench/drain.py --systems batchloop --batches 100 --runs 1 --profile bench/results``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

import batchloop as bl

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"

SYSTEMS = (
    "raw",
    "raw-cursor",
    "raw-psycopg",
    "batchloop",
    "batchloop-cursor",
    "batchloop-psycopg",
    "batchloop-metrics",
    "batchloop-observed",
    "batchloop-observed-callables",
    "pgqueuer",
    "procrastinate",
)
PEERS = {"pgqueuer": "peers.pgqueuer_peer", "procrastinate": "peers.procrastinate_peer"}
DEFAULT_SYSTEMS = tuple(
    s for s in SYSTEMS if not s.startswith(("batchloop-observed", "batchloop-metrics"))
)
BASELINE = {
    "raw-cursor": "raw",
    "batchloop-cursor": "raw-cursor",
    "batchloop-metrics": "batchloop",
    "batchloop-observed": "batchloop",
    "batchloop-observed-callables": "batchloop",
}
"""The baseline each system's median is divided by (default: ``raw``)."""

SELECT_HEAD = "SELECT id FROM items ORDER BY id LIMIT $1"
SELECT_AFTER = "SELECT id FROM items WHERE id > $2 ORDER BY id LIMIT $1"
DELETE = "DELETE FROM items WHERE id = ANY($1::bigint[])"
PG_SELECT_HEAD = "SELECT id FROM items ORDER BY id LIMIT %s"
PG_DELETE = "DELETE FROM items WHERE id = ANY(%s::bigint[])"
NAME = "drain"


# --------------------------------------------------------------------------------------------
# one trial, in its own process


async def fill_items(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE items (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " payload int NOT NULL)"
        )
        await conn.execute("INSERT INTO items (payload) SELECT generate_series(1, $1)", rows)
    finally:
        await conn.close()
    await settle(dsn, "items")


async def settle(dsn: str, *tables: str) -> None:
    common = import_module("peers.common")
    await common.settle(dsn, *tables)


async def remaining(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f"SELECT count(*) FROM {table}"))
    finally:
        await conn.close()


async def trial_raw(dsn: str, rows: int, batch: int, cursor: bool) -> dict[str, Any]:
    await fill_items(dsn, rows)
    conn = await asyncpg.connect(dsn)
    batches = 0
    last = 0
    try:
        started = time.perf_counter()
        while True:
            async with conn.transaction():
                if cursor:
                    found = await conn.fetch(SELECT_AFTER, batch, last)
                else:
                    found = await conn.fetch(SELECT_HEAD, batch)
                if not found:
                    break
                ids = [r[0] for r in found]
                await conn.execute(DELETE, ids)
            last = ids[-1]
            batches += 1
        drain_s = time.perf_counter() - started
    finally:
        await conn.close()
    return await _raw_result(dsn, drain_s, batches)


async def _raw_result(dsn: str, drain_s: float, batches: int, **settings: str) -> dict[str, Any]:
    return {
        "drain_s": drain_s,
        "batches": batches,
        "remaining": await remaining(dsn, "items"),
        "settings": {
            "connections": 1,
            "transaction": "one explicit transaction per batch",
            **settings,
        },
    }


async def trial_raw_psycopg(dsn: str, rows: int, batch: int) -> dict[str, Any]:
    import psycopg

    await fill_items(dsn, rows)
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    batches = 0
    try:
        started = time.perf_counter()
        while True:
            async with conn.transaction():
                cur = await conn.execute(PG_SELECT_HEAD, (batch,))
                found = await cur.fetchall()
                if not found:
                    break
                await conn.execute(PG_DELETE, ([r[0] for r in found],))
            batches += 1
        drain_s = time.perf_counter() - started
    finally:
        await conn.close()
    driver = f"psycopg {psycopg.__version__} (prepared after 5 runs, its default)"
    return await _raw_result(dsn, drain_s, batches, driver=driver)


@dataclass
class DrainState:
    """The one name a batchloop trial process drains (one trial per process)."""

    batch: int = 0
    last: int = 0
    finished: float = 0.0
    done: asyncio.Event | None = None


STATE = DrainState()


def _finished() -> bl.Idle:
    STATE.finished = time.perf_counter()
    assert STATE.done is not None
    STATE.done.set()
    return bl.Idle(cooldown=0.0)


@bl.work_query
async def drain_query(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    found = await conn.fetch(SELECT_HEAD, STATE.batch)
    return bl.Work([r[0] for r in found]) if found else _finished()


@bl.work_query
async def drain_query_cursor(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    found = await conn.fetch(SELECT_AFTER, STATE.batch, STATE.last)
    return bl.Work([r[0] for r in found]) if found else _finished()


@bl.worker
async def drain_worker(conn: Any, batch: list[int]) -> None:
    await conn.execute(DELETE, batch)
    STATE.last = batch[-1]  # read only by the cursor variant's query


@bl.work_query
async def drain_query_psycopg(conn: Any, name: str) -> bl.Work[list[int]] | bl.Idle:
    cur = await conn.execute(PG_SELECT_HEAD, (STATE.batch,))
    found = await cur.fetchall()
    return bl.Work([r[0] for r in found]) if found else _finished()


@bl.worker
async def drain_worker_psycopg(conn: Any, batch: list[int]) -> None:
    await conn.execute(PG_DELETE, (batch,))


def observe_everything(callables: bool, traces: bool = True) -> tuple[Any, Any]:
    """Metrics registered and (``traces``) an SDK tracer provider exporting in-process: what a
    service with both turned on pays (``callables``: with the work query's and worker's spans
    too). Returns (metrics, (provider, span exporter)); the provider is None without traces."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from batchloop import observe
    from batchloop.observe import tracing
    from batchloop.observe.metrics import Metrics

    metrics = Metrics()
    observe.register(metrics)
    if not traces:
        return metrics, (None, None)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracing.use(provider, callables=callables)
    return metrics, (provider, exporter)


async def trial_batchloop(dsn: str, rows: int, batch: int, variant: str) -> dict[str, Any]:
    await fill_items(dsn, rows)
    await bl.migrate(dsn)
    observed = (
        observe_everything(variant == "observed-callables", traces=variant != "metrics")
        if variant.startswith("observed") or variant == "metrics"
        else None
    )
    STATE.batch, STATE.last, STATE.done = batch, 0, asyncio.Event()
    query, worker = {
        "": (drain_query, drain_worker),
        "cursor": (drain_query_cursor, drain_worker),
        "psycopg": (drain_query_psycopg, drain_worker_psycopg),
        "observed": (drain_query, drain_worker),
        "observed-callables": (drain_query, drain_worker),
        "metrics": (drain_query, drain_worker),
    }[variant]
    driver = "psycopg" if variant == "psycopg" else "asyncpg"
    async with bl.Host(dsn, driver=driver):
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await bl.ping(conn, NAME, query, worker, config=bl.Config())
            started = time.perf_counter()
            await STATE.done.wait()
            drain_s = STATE.finished - started
            status = await bl.status(conn, NAME)
        finally:
            await conn.close()
    assert status is not None
    settings = {
        "driver": f"{driver} (Host pool)",
        "host": "Host defaults (pool 1..10, monitor 0.5 s, heartbeat 1 s)",
        "config": "Config() (debounce 0)",
        "worker_annotation": "batch: list[int] (validated by pydantic)",
    }
    if observed is not None:
        metrics, (provider, exporter) = observed
        spans = 0
        if provider is not None:
            provider.force_flush()
            spans = len(exporter.get_finished_spans())
        counted = metrics.registry.get_sample_value("batchloop_batches_total", {"name": NAME})
        per_batch = {"observed-callables": 3, "metrics": 0}.get(variant, 1)
        if spans < per_batch * status.batches or counted != status.batches:
            raise RuntimeError(f"observers saw {spans} spans and {counted} batches")
        settings["observe"] = (
            f"Metrics registered ({counted:.0f} batches counted); SDK TracerProvider with "
            f"BatchSpanProcessor into InMemorySpanExporter ({spans} spans)"
        )
    return {
        "drain_s": drain_s,
        "batches": status.batches,
        "remaining": await remaining(dsn, "items"),
        "settings": settings,
    }


async def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    system, dsn, rows, batch = spec["system"], spec["dsn"], spec["rows"], spec["batch"]
    if system in ("raw", "raw-cursor"):
        return await trial_raw(dsn, rows, batch, cursor=system == "raw-cursor")
    if system == "raw-psycopg":
        return await trial_raw_psycopg(dsn, rows, batch)
    if system.startswith("batchloop"):
        return await trial_batchloop(dsn, rows, batch, system.partition("-")[2])
    peer = import_module(PEERS[system])
    result: dict[str, Any] = await peer.trial(dsn, rows, batch, spec.get("options", {}))
    return result


def trial_main(spec: dict[str, Any]) -> None:
    sys.path.insert(0, str(HERE))
    profiler = None
    if spec.get("profile"):
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0002, async_mode="disabled")
        profiler.start()
    if spec.get("loop") == "uvloop":
        import uvloop

        result = uvloop.run(run_trial(spec))
    else:
        result = asyncio.run(run_trial(spec))
    if profiler is not None:
        profiler.stop()
        out = Path(spec["profile"]) / f"profile-{spec['system']}-{spec['batch']}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(profiler.output_text(unicode=False, show_all=False))
        result["profile"] = str(out)
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------
# the orchestrator


def database_url(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


async def admin(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def trial_in_subprocess(
    admin_dsn: str,
    prefix: str,
    script: str,
    spec: dict[str, Any],
    record: dict[str, Any],
    timeout: float,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``script --trial SPEC`` in a process of its own against a brand-new database
    ``<prefix>_*`` (its URL added to the spec as ``dsn``), dropped afterwards; ``record`` gets
    the JSON the trial prints last, or ``error`` saying why there is none."""
    dbname = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    asyncio.run(admin(admin_dsn, f'CREATE DATABASE "{dbname}"'))
    spec = {**spec, "dsn": database_url(admin_dsn, dbname)}
    try:
        proc = subprocess.run(
            [sys.executable, script, "--trial", json.dumps(spec)],
            cwd=HERE,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            record["error"] = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        else:
            record.update(json.loads(lines[-1]))
    except subprocess.TimeoutExpired:
        record["error"] = f"timed out after {timeout} s"
    finally:
        asyncio.run(admin(admin_dsn, f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)'))
    return record


def run_one(args: argparse.Namespace, system: str, batch: int, rows: int) -> dict[str, Any]:
    spec = {
        "system": system,
        "batch": batch,
        "rows": rows,
        "loop": args.loop,
        "profile": str(args.profile) if args.profile else None,
        "options": {
            "pgq_workers": args.pgq_workers,
            "procrastinate_max_concurrency": args.procrastinate_max_concurrency,
        },
    }
    record: dict[str, Any] = {"system": system, "batch": batch, "rows": rows}
    trial_in_subprocess(
        args.dsn, "bench_drain", str(Path(__file__).resolve()), spec, record, args.trial_timeout
    )
    if "error" not in record:
        record["rows_per_s"] = rows / record["drain_s"]
        if record["remaining"]:
            record["error"] = f"{record['remaining']} of {rows} rows left undrained"
    return record


def rows_for(args: argparse.Namespace, system: str, batch: int) -> int:
    rows = args.rows
    if batch == 1 and args.batch1_rows:
        rows = min(rows, args.batch1_rows)
    return min(rows, args.caps.get(system, rows))


def summarise(
    trials: list[dict[str, Any]], systems: list[str], batches: list[int]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    medians: dict[tuple[str, int], float] = {}
    for batch in batches:
        for system in systems:
            ok = [t for t in trials if t["system"] == system and t["batch"] == batch]
            rates = [t["rows_per_s"] for t in ok if "error" not in t]
            entry: dict[str, Any] = {
                "system": system,
                "batch": batch,
                "rows": ok[0]["rows"] if ok else 0,
                "runs": len(rates),
                "errors": sum("error" in t for t in ok),
            }
            if rates:
                medians[system, batch] = entry["median"] = statistics.median(rates)
                entry["min"], entry["max"] = min(rates), max(rates)
                enqueue = [t["rows"] / t["enqueue_s"] for t in ok if t.get("enqueue_s")]
                if enqueue:
                    entry["enqueue_median"] = statistics.median(enqueue)
                settings = [t["settings"] for t in ok if "settings" in t]
                if settings:
                    entry["settings"] = settings[0]
            out.append(entry)
    for entry in out:
        base = BASELINE.get(entry["system"], "raw")
        if base not in systems:
            base = "raw"
        entry["baseline"] = base
        key = (base, entry["batch"])
        if "median" in entry and key in medians:
            entry["ratio"] = entry["median"] / medians[key]
    return out


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def markdown(summary: list[dict[str, Any]], batches: list[int]) -> str:
    parts = []
    for batch in batches:
        rows = [e for e in summary if e["batch"] == batch]
        parts.append(f"#### Batch size {batch}\n")
        parts.append(
            "| system | rows | runs | median rows/s | min | max | x baseline | enqueue jobs/s |"
        )
        parts.append("|---|--:|--:|--:|--:|--:|--:|--:|")
        for e in rows:
            ratio = f"{fmt_ratio(e['ratio'])}x {e['baseline']}" if "ratio" in e else "-"
            runs = f"{e['runs']}" + (f" ({e['errors']} failed)" if e["errors"] else "")
            parts.append(
                f"| {e['system']} | {e['rows']:,} | {runs} | {fmt_rate(e.get('median'))} "
                f"| {fmt_rate(e.get('min'))} | {fmt_rate(e.get('max'))} | {ratio} "
                f"| {fmt_rate(e.get('enqueue_median'))} |"
            )
        parts.append("")
    return "\n".join(parts)


def machine(dsn: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
    except OSError:
        pass
    packages = {}
    for name in ("batchloop", "asyncpg", "pgqueuer", "procrastinate", "psycopg", "uvloop"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    info["packages"] = packages
    source = Path(bl.__file__).resolve().parent.parent
    info["batchloop_source"] = str(source)
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        info["batchloop_commit"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=source,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()

    async def server() -> dict[str, Any]:
        conn = await asyncpg.connect(dsn)
        try:
            names = (
                "server_version",
                "shared_buffers",
                "synchronous_commit",
                "fsync",
                "wal_level",
                "max_wal_size",
                "checkpoint_timeout",
                "autovacuum",
            )
            return {n: await conn.fetchval(f"SHOW {n}") for n in names}
        finally:
            await conn.close()

    info["postgres"] = asyncio.run(server())
    return info


def parse_caps(values: list[str]) -> dict[str, int]:
    caps = {}
    for value in values:
        system, _, n = value.partition("=")
        if system not in SYSTEMS or not n.isdigit():
            raise SystemExit(f"--cap wants SYSTEM=ROWS with SYSTEM in {', '.join(SYSTEMS)}")
        caps[system] = int(n)
    return caps


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batches", default="1,10,100,1000")
    p.add_argument("--batch1-rows", type=int, default=10_000, help="rows at batch size 1")
    p.add_argument("--cap", action="append", default=None, help="SYSTEM=ROWS (repeatable)")
    p.add_argument("--runs", type=int, default=3, help="rounds; every system runs once a round")
    p.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help="comma-separated, or 'all' (default: all but batchloop-observed)",
    )
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    p.add_argument("--pgq-workers", type=int, default=1, help="pgqueuer QueueManagers")
    p.add_argument(
        "--procrastinate-max-concurrency",
        type=int,
        default=20,
        help="procrastinate concurrency = min(batch, this)",
    )
    p.add_argument("--trial-timeout", type=float, default=1800)
    p.add_argument("--json", type=Path, help="default: bench/results/drain-<time>.json")
    p.add_argument("--markdown", type=Path, help="also write the tables here")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. the commit)")
    p.add_argument(
        "--profile",
        type=Path,
        help="run each trial under pyinstrument and write its profile into this directory",
    )
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report", type=Path, help="only print the tables of a saved JSON result")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.trial is None and args.report is None:
        args.dsn = args.dsn or "postgresql://127.0.0.1:5432/postgres"
        if not args.dsn.startswith(("postgresql://", "postgres://")):
            raise SystemExit("--dsn must be a postgresql:// URL")
        args.batch_list = [int(b) for b in args.batches.split(",") if b]
        args.system_list = (
            list(SYSTEMS) if args.systems == "all" else [s for s in args.systems.split(",") if s]
        )
        unknown = set(args.system_list) - set(SYSTEMS)
        if unknown or not args.system_list or not args.batch_list:
            raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
        if "raw" not in args.system_list:
            args.system_list.insert(0, "raw")  # every ratio needs it
        args.caps = parse_caps(args.cap if args.cap is not None else ["procrastinate=10000"])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.trial is not None:
        trial_main(json.loads(args.trial))
        return 0
    if args.report is not None:
        saved = json.loads(args.report.read_text())
        print(markdown(saved["summary"], saved["meta"]["batches"]), end="")
        return 0

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    started = dt.datetime.now(dt.timezone.utc)
    meta = {
        "started": started.isoformat(timespec="seconds"),
        "command": "python bench/drain.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": args.rows,
        "batch1_rows": args.batch1_rows,
        "caps": args.caps,
        "runs": args.runs,
        "batches": args.batch_list,
        "systems": args.system_list,
        "loop": args.loop,
        "note": args.note,
        "machine": machine(args.dsn),
    }
    trials: list[dict[str, Any]] = []
    total = args.runs * len(args.batch_list) * len(args.system_list)
    for rnd in range(args.runs):
        for batch in args.batch_list:
            for system in args.system_list:
                rows = rows_for(args, system, batch)
                record = run_one(args, system, batch, rows)
                record["round"] = rnd
                trials.append(record)
                if "error" in record:
                    say(f"[{len(trials)}/{total}] batch {batch} {system}: FAILED {record['error']}")
                else:
                    say(
                        f"[{len(trials)}/{total}] batch {batch} {system}: "
                        f"{record['rows_per_s']:,.0f} rows/s ({rows:,} rows, "
                        f"{record['drain_s']:.2f} s)"
                    )
    summary = summarise(trials, args.system_list, args.batch_list)
    meta["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    result = {"meta": meta, "summary": summary, "trials": trials}
    path = args.json or RESULTS / f"drain-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    tables = markdown(summary, args.batch_list)
    print(tables)
    print(f"JSON: {path}")
    if args.markdown:
        args.markdown.write_text(tables)
    failed = [t for t in trials if "error" in t]
    if failed:
        print(f"{len(failed)} trial(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
