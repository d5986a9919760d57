"""Many names: 10,000 names each pinged once with a few rows, drained by three hosts.

    python bench/many_names.py --names 10000 --rows 3 --hosts 3

Three host processes (``hosts.py``, library defaults: ``Idle()`` cools down for 2 s polling
every 0.2 s, pool of 10, monitor every 0.5 s) start idle; ``--producers`` connections then
insert ``--rows`` rows for each name and ping it, one transaction per name, as fast as they can.
Measured: how long producing took, the time from the first ping until every row is processed
(drained) and until every loop has gone idle and released its name, the per-name latency from
its ping's commit to its first batch's worker start (``CLOCK_MONOTONIC`` on both ends), how the
names and batches spread over the hosts, the most names a host held at once (sampled every
0.25 s from ``pg_locks``), and the statements the hosts sent per name.

Prints markdown tables and writes ``bench/results/many_names-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import asyncpg
import hosts
from hosts import Fleet, bench_database, dist, fmt, host_args

import batchloop as bl

_HELD = """
SELECT a.pid AS backend, a.application_name AS app, count(*) AS names
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted AND l.mode = 'ExclusiveLock'
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND a.application_name LIKE 'batchloop/%'
 GROUP BY 1, 2
"""


async def _produce(dsn: str, names: list[str], rows: int, acks: dict[str, float]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for name in names:
            tr = conn.transaction()
            await tr.start()
            await conn.execute(
                "INSERT INTO bench_items (name) SELECT $1 FROM generate_series(1, $2)", name, rows
            )
            await bl.ping(conn, name, hosts.bench_query, hosts.bench_worker)
            await tr.commit()
            acks[name] = time.monotonic()
    finally:
        await conn.close()


async def run(
    admin_dsn: str,
    *,
    names: int = 10_000,
    rows: int = 3,
    n_hosts: int = 3,
    producers: int = 4,
    cooldown: float = 2.0,
    timeout: float = 900.0,
    verbose: bool = False,
    say: Any = print,
) -> dict[str, Any]:
    all_names = [f"n{i:05d}" for i in range(names)]
    acks: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    tasks: list[asyncio.Task[None]] = []
    async with bench_database(admin_dsn, "many") as dsn:
        fleet = Fleet(dsn, verbose=verbose)
        obs = await asyncpg.connect(dsn)
        try:
            procs = [
                await fleet.spawn("host", *host_args(cooldown=cooldown, count=True))
                for _ in range(n_hosts)
            ]
            app_to_pid = {f"batchloop/{p.host_id}": p.pid for p in procs}
            stmts0 = [await fleet.signal_stats(p) for p in procs]
            say(f"{names} names x {rows} rows from {producers} producers, {n_hosts} hosts")
            t0 = time.monotonic()
            tasks += [
                asyncio.create_task(_produce(dsn, all_names[i::producers], rows, acks))
                for i in range(producers)
            ]
            produced_at = drained_at = idle_at = None
            while time.monotonic() - t0 < timeout:
                now = time.monotonic() - t0
                if produced_at is None and all(t.done() for t in tasks):
                    for t in tasks:
                        t.result()  # raise a producer's failure
                    produced_at = now
                held = await obs.fetch(_HELD)
                remaining = await obs.fetchval("SELECT count(*) FROM bench_items")
                per_host: dict[str, int] = {}
                for r in held:
                    pid = app_to_pid.get(r["app"])
                    if pid is not None:
                        per_host[str(pid)] = per_host.get(str(pid), 0) + int(r["names"])
                samples.append({"t": round(now, 2), "remaining": remaining, "held": per_host})
                if produced_at is not None and drained_at is None and remaining == 0:
                    drained_at = now
                    say(f"drained at {now:.1f} s (produced by {produced_at:.1f} s)")
                if drained_at is not None and not per_host:
                    busy = await obs.fetchval(
                        "SELECT count(*) FROM batchloop.workers WHERE status <> 'idle'"
                    )
                    if busy == 0:
                        idle_at = now
                        break
                await asyncio.sleep(0.25)
            stmts1 = [await fleet.signal_stats(p) for p in procs]
            spread = await obs.fetch(
                "SELECT host_pid, count(*) AS batches, count(DISTINCT name) AS names,"
                " sum(items) AS items FROM bench_done GROUP BY host_pid ORDER BY host_pid"
            )
            multi = await obs.fetchval(
                "SELECT count(*) FROM (SELECT name FROM bench_done GROUP BY name"
                " HAVING count(DISTINCT host_pid) > 1) x"
            )
            firsts = await obs.fetch("SELECT name, min(w_mono) AS w FROM bench_done GROUP BY name")
            processed = await obs.fetchval("SELECT coalesce(sum(items), 0) FROM bench_done")
        finally:
            for t in tasks:
                t.cancel()
            await fleet.close()
            await obs.close()
    lat = [r["w"] - acks[r["name"]] for r in firsts if r["name"] in acks]
    peak: dict[str, int] = {}
    for s in samples:
        for pid, n in s["held"].items():
            peak[pid] = max(peak.get(pid, 0), n)
    statements = [b["statements"] - a["statements"] for a, b in zip(stmts0, stmts1, strict=True)]
    by_pid = {str(p.pid): s for p, s in zip(procs, statements, strict=True)}
    kinds: dict[str, int] = {}
    for a, b in zip(stmts0, stmts1, strict=True):
        for label, n in b.get("kinds", {}).items():
            kinds[label] = kinds.get(label, 0) + n - a.get("kinds", {}).get(label, 0)
    return {
        "scenario": "many_names",
        "names": names,
        "rows_per_name": rows,
        "hosts": n_hosts,
        "producers": producers,
        "cooldown": cooldown,
        "produce_s": round(produced_at, 2) if produced_at is not None else None,
        "drain_s": round(drained_at, 2) if drained_at is not None else None,
        "all_idle_s": round(idle_at, 2) if idle_at is not None else None,
        "items_processed": int(processed),
        "names_on_several_hosts": int(multi),
        "ping_to_first_batch": dist(lat, scale=1.0),
        "spread": [
            {
                "host_pid": r["host_pid"],
                "batches": r["batches"],
                "names": r["names"],
                "items": int(r["items"]),
                "peak_names_held": peak.get(str(r["host_pid"]), 0),
                "statements": by_pid.get(str(r["host_pid"])),
            }
            for r in spread
        ],
        "statements_total": sum(statements),
        "statements_per_name": round(sum(statements) / names, 2),
        "statements_per_name_by_kind": {
            label: round(n / names, 2) for label, n in sorted(kinds.items(), key=lambda kv: -kv[1])
        },
        "timeline": samples[:: max(1, len(samples) // 200)],
        "provenance": hosts.provenance(),
    }


def markdown(summary: dict[str, Any]) -> str:
    s = summary
    lat = s["ping_to_first_batch"]
    lines = [
        "| names | rows each | hosts | producing s | drained s | all idle s | ping to first "
        "batch p50 s | p99 s | max s | statements per name |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {s['names']} | {s['rows_per_name']} | {s['hosts']} | {fmt(s['produce_s'])} | "
        f"{fmt(s['drain_s'])} | {fmt(s['all_idle_s'])} | {fmt(lat['p50'])} | {fmt(lat['p99'])} "
        f"| {fmt(lat['max'])} | {s['statements_per_name']} |",
        "",
        "| host pid | names | batches | items | most names held at once | statements sent |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in s["spread"]:
        lines.append(
            f"| {r['host_pid']} | {r['names']} | {r['batches']} | {r['items']} | "
            f"{r['peak_names_held']} | {fmt(r['statements'])} |"
        )
    by_kind = s.get("statements_per_name_by_kind") or {}
    if by_kind:
        lines += ["", "| statements per name, by step | per name |", "| --- | ---: |"]
        lines += [f"| {label} | {n} |" for label, n in by_kind.items()]
    lines += [
        "",
        f"{s['items_processed']} of {s['names'] * s['rows_per_name']} rows processed; "
        f"{s['names_on_several_hosts']} names ran on more than one host; {s['producers']} "
        f"producer connections; Idle cooldown {s['cooldown']} s.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", default=hosts.default_admin_dsn(), help="server (admin) URL")
    parser.add_argument("--names", type=int, default=10_000)
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument(
        "--cooldown", type=float, default=2.0, help="Idle(cooldown=...) of the query"
    )
    parser.add_argument("--timeout", type=float, default=900.0)
    hosts.output_options(parser)
    args = parser.parse_args(argv)
    summary = asyncio.run(
        run(
            args.dsn,
            names=args.names,
            rows=args.rows,
            n_hosts=args.hosts,
            producers=args.producers,
            cooldown=args.cooldown,
            timeout=args.timeout,
            verbose=args.verbose,
            say=hosts.say(args),
        )
    )
    hosts.report("many_names", summary, argv, args.out, markdown)


if __name__ == "__main__":
    main()
