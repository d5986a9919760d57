"""Idle cost: what 3 hosts and 1,000 idle named workers cost the database per second.

    python bench/idle_cost.py --seconds 60 --workers 1000 --hosts 3 [--vacuum]

Three phases of ``--seconds`` each on one database:

1. ``hosts, no workers``: three host processes, nothing to do (the fixed price of a host);
2. ``hosts + idle workers``: the same hosts after ``--workers`` names were created, ran once
   and went idle (the marginal price of an idle worker is phase 2 minus phase 1);
3. ``idle workers, no hosts``: the hosts stopped (the workers alone; should be nothing).

Per phase: statements per second the hosts sent (counted in each host process by an asyncpg
query logger), transactions and row counters per second from ``pg_stat_database`` (the
observer's own few statements subtracted), scans and updates of batchloop's tables from
``pg_stat_user_tables``, and WAL bytes per second attributed to the database with
``pg_walinspect`` (records touching its relations plus their transactions' commits; read from
a separate observer database, so the observer adds nothing), next to the raw cluster-wide LSN
rate, which on a shared server is mostly other databases. Also the monitor query's plan and
execution time with none and with all the idle workers (``EXPLAIN ANALYZE``).

Right after the workers went idle, the index the monitor reads (``workers_active``, partial on
running/waiting) still holds an entry for each worker's dead ``running`` row version, and a
bitmap scan never marks them dead: the monitor reads them every tick until VACUUM (autovacuum,
eventually) removes them. ``--vacuum`` runs that VACUUM before phase 2, to measure the state
autovacuum leads to.

Prints markdown tables and writes ``bench/results/idle_cost-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import asyncpg
import hosts
from hosts import Fleet, WalMeter, bench_database, db_counters, diff, fmt, host_args

import batchloop as bl
from batchloop import sql
from batchloop.registry import refs

TABLE_STATS = """
SELECT relname, seq_scan, seq_tup_read, coalesce(idx_scan, 0) AS idx_scan,
       coalesce(idx_tup_fetch, 0) AS idx_tup_fetch, n_tup_ins, n_tup_upd, n_tup_hot_upd
  FROM pg_stat_user_tables WHERE schemaname = 'batchloop' ORDER BY relname
"""
OBSERVER_STATEMENTS_PER_READ = 2
"""``table_stats`` runs two statements in the measured database."""


async def table_stats(conn: Any) -> dict[str, dict[str, int]]:
    await conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = await conn.fetch(TABLE_STATS)
    return {r["relname"]: {k: int(v) for k, v in r.items() if k != "relname"} for r in rows}


async def monitor_plan(conn: Any) -> dict[str, Any]:
    """EXPLAIN ANALYZE of the hosts' monitor query, as a host with the bench callables runs it."""
    args = (500, refs("work_query"), refs("worker"))
    text = sql.query("orphans", "batchloop")
    times = []
    for _ in range(20):
        plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {text}", *args)
        times.append(json.loads(plan)[0]["Execution Time"])
    plan_text = await conn.fetch(f"EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {text}", *args)
    return {
        "execution_ms_median": round(sorted(times)[len(times) // 2], 3),
        "plan": [r[0] for r in plan_text],
    }


async def run(
    admin_dsn: str,
    *,
    seconds: float = 60.0,
    workers: int = 1000,
    n_hosts: int = 3,
    sample_every: float = 2.0,
    settle: float = 12.0,
    vacuum: bool = False,
    verbose: bool = False,
    say: Any = print,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "scenario": "idle_cost",
        "seconds": seconds,
        "workers": workers,
        "hosts": n_hosts,
        "settle": settle,
        "vacuum": vacuum,
        "provenance": hosts.provenance(),
        "phases": {},
    }
    async with (
        bench_database(admin_dsn, "idle") as dsn,
        bench_database(admin_dsn, "idleobs") as obs_dsn,
    ):
        fleet = Fleet(dsn, verbose=verbose)
        conn = await asyncpg.connect(dsn)
        obs = await asyncpg.connect(obs_dsn)
        database = await conn.fetchval("SELECT current_database()")
        try:
            summary["monitor_query_no_workers"] = await monitor_plan(conn)
            procs = [
                await fleet.spawn("host", *host_args(cooldown=0.0, count=True))
                for _ in range(n_hosts)
            ]
            await asyncio.sleep(settle)  # past start-up, and its statistics reported
            say(f"phase 1: {n_hosts} hosts, no workers, {seconds} s")
            summary["phases"]["hosts, no workers"] = await _phase(
                fleet, procs, conn, obs, database, seconds, sample_every
            )
            say(f"creating {workers} workers and letting them go idle")
            await _create_idle(conn, workers)
            if vacuum:
                await conn.execute("VACUUM batchloop.workers, batchloop.worker_state")
            # Idle backends report their statistics 10 s late at most: let the creation's
            # counts land before the phase starts.
            await asyncio.sleep(settle)
            say(f"phase 2: {n_hosts} hosts, {workers} idle workers, {seconds} s")
            summary["phases"]["hosts + idle workers"] = await _phase(
                fleet, procs, conn, obs, database, seconds, sample_every
            )
            summary["monitor_query_idle_workers"] = await monitor_plan(conn)
            await fleet.close()
            await asyncio.sleep(settle)
            say(f"phase 3: {workers} idle workers, no hosts, {seconds} s")
            summary["phases"]["idle workers, no hosts"] = await _phase(
                fleet, [], conn, obs, database, seconds, sample_every
            )
        finally:
            await fleet.close()
            await conn.close()
            await obs.close()
    p1, p2 = summary["phases"]["hosts, no workers"], summary["phases"]["hosts + idle workers"]
    summary["per_idle_worker"] = {
        k: round((p2[k] - p1[k]) / workers, 4)
        for k in ("statements_per_s", "xacts_per_s", "wal_bytes_per_s", "tup_returned_per_s")
        if p2.get(k) is not None and p1.get(k) is not None
    }
    summary["goals"] = {
        "idle_worker_costs_nothing_but_monitor": {
            "extra_statements_per_s": round(p2["statements_per_s"] - p1["statements_per_s"], 3),
            "extra_wal_bytes_per_s": (
                round(p2["wal_bytes_per_s"] - p1["wal_bytes_per_s"], 1)
                if p2["wal_bytes_per_s"] is not None
                else None
            ),
            "extra_rows_read_per_s": round(p2["tup_returned_per_s"] - p1["tup_returned_per_s"]),
        }
    }
    return summary


async def _create_idle(conn: Any, workers: int) -> None:
    """Create the names (each ping creates a running worker); the hosts run each once and it
    goes idle (Idle(cooldown=0)). Waits until all are idle and unowned."""
    for start in range(0, workers, 100):
        async with conn.transaction():
            for i in range(start, min(workers, start + 100)):
                await bl.ping(conn, f"idle{i:05d}", hosts.bench_query, hosts.bench_worker)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        left = await conn.fetchval("SELECT count(*) FROM batchloop.workers WHERE status <> 'idle'")
        if left == 0:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"{left} workers did not go idle")


async def _phase(
    fleet: Fleet,
    procs: list[hosts.Proc],
    conn: Any,
    obs: Any,
    database: str,
    seconds: float,
    sample_every: float,
) -> dict[str, Any]:
    stmts0 = [await fleet.signal_stats(p) for p in procs]
    tables0 = await table_stats(conn)
    db0 = await db_counters(obs, database)
    meter = await WalMeter(obs, database).start()
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        await asyncio.sleep(min(sample_every, seconds - (time.monotonic() - t0)))
        await meter.sample()
    elapsed = time.monotonic() - t0
    await meter.sample(final=True)
    stmts1 = [await fleet.signal_stats(p) for p in procs]
    tables1 = await table_stats(conn)
    db1 = await db_counters(obs, database)
    await meter.close()
    d = diff(db1, db0)
    d["xact_commit"] -= OBSERVER_STATEMENTS_PER_READ  # the table_stats read at the start
    wal = meter.result()
    statements = sum(b["statements"] - a["statements"] for a, b in zip(stmts0, stmts1, strict=True))
    tables = {
        name: {k: v - tables0.get(name, {}).get(k, 0) for k, v in t.items()}
        for name, t in tables1.items()
    }
    return {
        "seconds": round(elapsed, 1),
        "statements_per_s": round(statements / elapsed, 2),
        "statements_per_s_per_host": [
            round((b["statements"] - a["statements"]) / elapsed, 2)
            for a, b in zip(stmts0, stmts1, strict=True)
        ],
        "xacts_per_s": round((d["xact_commit"] + d["xact_rollback"]) / elapsed, 2),
        "tup_returned_per_s": round(d["tup_returned"] / elapsed, 1),
        "tup_fetched_per_s": round(d["tup_fetched"] / elapsed, 1),
        "rows_written_per_s": round(
            (d["tup_inserted"] + d["tup_updated"] + d["tup_deleted"]) / elapsed, 2
        ),
        "blks_hit_per_s": round(d["blks_hit"] / elapsed, 1),
        "wal_bytes_per_s": round(wal["db_bytes"] / elapsed, 1) if wal["exact"] else None,
        "wal_records_per_s": round(wal["db_records"] / elapsed, 2) if wal["exact"] else None,
        "wal_fpi_bytes_per_s": round(wal["db_fpi_bytes"] / elapsed, 1) if wal["exact"] else None,
        "wal_record_kinds": wal["db_record_kinds"],
        "cluster_wal_bytes_per_s_raw": round(wal["cluster_bytes"] / elapsed),
        "tables": tables,
        "db_stats": d,
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| phase | statements/s (hosts) | xacts/s | rows read/s | rows written/s | WAL bytes/s "
        "(this db) | of which full-page images | WAL records/s | cluster WAL bytes/s (raw, "
        "shared) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, p in summary["phases"].items():
        lines.append(
            f"| {name} | {p['statements_per_s']} | {p['xacts_per_s']} | "
            f"{p['tup_returned_per_s']} | {p['rows_written_per_s']} | "
            f"{fmt(p['wal_bytes_per_s'])} | {fmt(p['wal_fpi_bytes_per_s'])} | "
            f"{fmt(p['wal_records_per_s'])} | "
            f"{p['cluster_wal_bytes_per_s_raw']} |"
        )
    g = summary["goals"]["idle_worker_costs_nothing_but_monitor"]
    m0, m1 = summary["monitor_query_no_workers"], summary["monitor_query_idle_workers"]
    after = ", after VACUUM" if summary["vacuum"] else ""
    lines += [
        "",
        f"{summary['hosts']} hosts, {summary['workers']} idle workers, {summary['seconds']} s "
        f"per phase. Adding the idle workers changed: statements/s by "
        f"{g['extra_statements_per_s']}, WAL bytes/s by {fmt(g['extra_wal_bytes_per_s'])}, rows "
        f"read/s by {g['extra_rows_read_per_s']} (the monitor query{after}).",
        f"Monitor query (one per host per monitor_interval): {m0['execution_ms_median']} ms with "
        f"no workers, {m1['execution_ms_median']} ms with {summary['workers']} idle workers "
        "(server execution time, median of 20).",
        "WAL records in 'hosts + idle workers': "
        f"{summary['phases']['hosts + idle workers']['wal_record_kinds']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", default=hosts.default_admin_dsn(), help="server (admin) URL")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument(
        "--settle", type=float, default=12.0, help="pause before each phase (stats lag 10 s)"
    )
    parser.add_argument(
        "--vacuum",
        action="store_true",
        help="VACUUM batchloop's tables once the workers are idle (as autovacuum would, later)",
    )
    hosts.output_options(parser)
    args = parser.parse_args(argv)
    summary = asyncio.run(
        run(
            args.dsn,
            seconds=args.seconds,
            workers=args.workers,
            n_hosts=args.hosts,
            settle=args.settle,
            vacuum=args.vacuum,
            verbose=args.verbose,
            say=hosts.say(args),
        )
    )
    hosts.report("idle_cost", summary, argv, args.out, markdown)


if __name__ == "__main__":
    main()
