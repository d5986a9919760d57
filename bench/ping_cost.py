"""Ping cost on a running worker: throughput against plain round trips, and WAL per ping.

    python bench/ping_cost.py --seconds 1 --rounds 10 --wal-pings 10000

The worker is created by a first ping and, with no host at all, stays ``running``: every later
ping takes the no-op path (its transaction-level shared wake lock, one read of ``workers``).

Throughput: from 1 and from 8 connections of this process (asyncio), ``batchloop.ping`` in
autocommit against ``SELECT 1``, alternating in ``--rounds`` rounds of ``--seconds`` each so that
drift on a noisy machine hits both alike; medians over the rounds, and client CPU per call.

WAL: ``--wal-pings`` pings on one connection, then as many plain ``SELECT 1`` transactions as
the baseline; WAL attributed to the bench database with ``pg_walinspect`` (records that touch
its relations, plus their transactions' commit records) and the raw, cluster-wide
``pg_current_wal_lsn()`` advance (other databases on a shared server add to it). The database
is vacuumed first: dead catalog tuples left by the migration are otherwise pruned (WAL-logged)
by whichever backend reads their page next, the pinging one included. A positive
control (single-row INSERTs) shows the meter sees writes. Also checked inside a transaction:
after a ping there is no transaction id (so nothing to write or commit) and no row lock.

Prints a markdown table and writes ``bench/results/ping_cost-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import hosts
from hosts import WalMeter, bench_database, db_counters, diff, fmt

import batchloop as bl

NAME = "pinged"


async def _ping(conn: Any) -> None:
    await bl.ping(conn, NAME, hosts.bench_query, hosts.bench_worker)


async def _select1(conn: Any) -> None:
    await conn.fetchval("SELECT 1")


KINDS: dict[str, Callable[[Any], Awaitable[None]]] = {"select1": _select1, "ping": _ping}


async def _rate(conns: list[Any], op: Callable[[Any], Awaitable[None]], seconds: float) -> dict:
    count = 0
    stop = False

    async def drive(conn: Any) -> None:
        nonlocal count
        while not stop:
            await op(conn)
            count += 1

    tasks = [asyncio.create_task(drive(c)) for c in conns]
    cpu0, t0 = time.process_time(), time.monotonic()
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks)
    wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
    return {"per_s": count / wall, "client_cpu_us": cpu / count * 1e6 if count else None}


async def run(
    admin_dsn: str,
    *,
    seconds: float = 1.0,
    rounds: int = 10,
    connections: tuple[int, ...] = (1, 8),
    wal_pings: int = 10_000,
    say: Any = print,
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "scenario": "ping_cost",
        "seconds": seconds,
        "rounds": rounds,
        "wal_pings": wal_pings,
        "provenance": hosts.provenance(),
    }
    async with bench_database(admin_dsn, "ping") as dsn:
        conns = [await asyncpg.connect(dsn) for _ in range(max(connections))]
        obs = await asyncpg.connect(dsn)
        try:
            main = conns[0]
            created = await bl.ping(main, NAME, hosts.bench_query, hosts.bench_worker)
            status = await bl.status(main, NAME)
            assert status is not None
            summary["worker"] = {"created": created, "state": status.state, "owner": status.owner}
            for c in conns:  # warm statement caches and connections
                for op in KINDS.values():
                    for _ in range(50):
                        await op(c)
            summary["throughput"] = {}
            for n in connections:
                per: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
                for r in range(rounds):
                    order = list(KINDS) if r % 2 == 0 else list(reversed(KINDS))
                    for kind in order:
                        per[kind].append(await _rate(conns[:n], KINDS[kind], seconds))
                out = {}
                for kind, results in per.items():
                    out[kind] = {
                        "per_s_median": round(statistics.median(x["per_s"] for x in results)),
                        "per_s_rounds": [round(x["per_s"]) for x in results],
                        "client_cpu_us_median": round(
                            statistics.median(x["client_cpu_us"] for x in results), 1
                        ),
                    }
                out["ratio_ping_to_select1"] = round(
                    out["ping"]["per_s_median"] / out["select1"]["per_s_median"], 3
                )
                summary["throughput"][str(n)] = out
                say(
                    f"{n} connection(s): ping {out['ping']['per_s_median']}/s, SELECT 1 "
                    f"{out['select1']['per_s_median']}/s"
                )
            # Dead catalog tuples the migration left (CREATE FUNCTION ...) get pruned by
            # whichever backend next reads their page, writing WAL; vacuum first so that this
            # one-off cleanup is not billed to the pings.
            await obs.execute("VACUUM")
            summary["wal"] = await _wal(main, obs, wal_pings)
            summary["in_transaction"] = await _in_transaction(main)
        finally:
            for c in [*conns, obs]:
                await c.close()
    w = summary["wal"]
    rows = w["ping"]["db_stats"]
    writes = rows["tup_inserted"] + rows["tup_updated"] + rows["tup_deleted"]
    steady = w["db_bytes_per_ping_after_first_window"]
    summary["goals"] = {
        "zero_wal_per_ping": {
            "goal": 0,
            "measured_bytes_per_ping": w["db_bytes_per_ping"],
            "measured_after_first_window": steady,
            "rows_written": writes,
            "xid_assigned": summary["in_transaction"]["xid_assigned"],
            # Steady state: no WAL once any one-off pruning by the first reads is done, no
            # row written, and no transaction id (nothing for the commit to write).
            "met": (
                steady == 0 and writes == 0 and summary["in_transaction"]["xid_assigned"] is None
                if w["exact"]
                else None
            ),
        }
    }
    return summary


async def _wal(conn: Any, obs: Any, n: int, windows: int = 5) -> dict[str, Any]:
    """WAL of n pings (in ``windows`` consecutive windows, to tell one-off effects from a
    steady cost), of n plain transactions, and of a positive control."""
    out: dict[str, Any] = {}
    for kind, op, parts in (("ping", _ping, windows), ("select1", _select1, 1)):
        before = await db_counters(obs)
        per_window, kinds = [], {}
        total: dict[str, Any] = {"db_bytes": 0, "db_records": 0, "cluster_bytes": 0}
        for w in range(parts):
            meter = await WalMeter(obs).start()
            size = n // parts + (1 if w < n % parts else 0)
            for i in range(size):
                await op(conn)
                if i % 1000 == 999:
                    await meter.sample()
            await meter.sample(final=True)
            await meter.close()
            r = meter.result()
            per_window.append(r["db_bytes"])
            for key in total:
                total[key] = (total[key] or 0) + (r[key] or 0) if r[key] is not None else None
            for k, (records, size) in (r["db_record_kinds"] or {}).items():
                was = kinds.get(k, [0, 0])
                kinds[k] = [was[0] + records, was[1] + size]
        out[kind] = {
            **total,
            "db_bytes_per_window": per_window,
            "db_record_kinds": kinds,
            "db_stats": diff(await db_counters(obs), before),
        }
    control_n = min(n, 200)
    meter = await WalMeter(obs).start()
    for _ in range(control_n):
        await conn.execute("INSERT INTO bench_items (name) VALUES ('control')")
    await meter.sample(final=True)
    await meter.close()
    out["control_inserts"] = {"transactions": control_n, **meter.result()}
    out["exact"] = meter.exact
    out["windows"] = windows
    if meter.exact:
        extra = out["ping"]["db_bytes"] - out["select1"]["db_bytes"]
        out["db_bytes_per_ping"] = round(extra / n, 3)
        later = sum(out["ping"]["db_bytes_per_window"][1:])
        out["db_bytes_per_ping_after_first_window"] = (
            round(later / (n - n // windows), 3) if windows > 1 else None
        )
        out["control_bytes_per_insert"] = round(out["control_inserts"]["db_bytes"] / control_n, 1)
    else:
        out["db_bytes_per_ping"] = out["db_bytes_per_ping_after_first_window"] = None
    out["cluster_bytes_per_ping_raw"] = round(
        (out["ping"]["cluster_bytes"] - out["select1"]["cluster_bytes"]) / n, 1
    )
    return out


async def _in_transaction(conn: Any) -> dict[str, Any]:
    """Inside one transaction: after a ping, no transaction id and no row or xid locks."""
    async with conn.transaction():
        result = await bl.ping(conn, NAME, hosts.bench_query, hosts.bench_worker)
        xid = await conn.fetchval("SELECT pg_current_xact_id_if_assigned()::text")
        locks = await conn.fetch(
            "SELECT locktype, mode, count(*) AS n FROM pg_locks WHERE pid = pg_backend_pid() "
            "AND locktype <> 'virtualxid' GROUP BY 1, 2 ORDER BY 1, 2"
        )
    return {
        "ping": result,
        "xid_assigned": xid,
        "locks": [f"{r['locktype']}/{r['mode']} x{r['n']}" for r in locks],
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| connections | SELECT 1 per s | ping per s | ping / SELECT 1 | client CPU us: SELECT 1 "
        "| client CPU us: ping |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, t in summary["throughput"].items():
        lines.append(
            f"| {n} | {t['select1']['per_s_median']} | {t['ping']['per_s_median']} | "
            f"{t['ratio_ping_to_select1']} | {t['select1']['client_cpu_us_median']} | "
            f"{t['ping']['client_cpu_us_median']} |"
        )
    w = summary["wal"]
    n = summary["wal_pings"]
    lines += [
        "",
        f"| WAL over {n} transactions | bench database bytes | records "
        "| cluster-wide LSN advance |",
        "| --- | ---: | ---: | ---: |",
    ]
    for kind, label in (("ping", "ping (running worker)"), ("select1", "SELECT 1 (baseline)")):
        lines.append(
            f"| {label} | {fmt(w[kind]['db_bytes'])} | {fmt(w[kind]['db_records'])} | "
            f"{w[kind]['cluster_bytes']} |"
        )
    c = w["control_inserts"]
    lines.append(
        f"| control: {c['transactions']} single-row INSERTs | {fmt(c['db_bytes'])} | "
        f"{fmt(c['db_records'])} | {c['cluster_bytes']} |"
    )
    p = w["ping"]["db_stats"]
    t = summary["in_transaction"]
    g = summary["goals"]["zero_wal_per_ping"]
    lines += [
        "",
        f"WAL per ping (bench database, minus baseline): {fmt(w['db_bytes_per_ping'])} bytes, "
        f"{fmt(w['db_bytes_per_ping_after_first_window'])} after the first window (goal 0: "
        f"{ {True: 'met', False: 'NOT met', None: 'unknown'}[g['met']] }); "
        f"raw cluster-wide difference {w['cluster_bytes_per_ping_raw']} bytes/ping (noise from "
        "other databases). Rows written by the pings: inserted "
        f"{p['tup_inserted']}, updated {p['tup_updated']}, deleted {p['tup_deleted']}.",
        "WAL records the pings caused in the bench database ([records, bytes]): "
        f"{w['ping']['db_record_kinds'] or 'none'}; "
        f"bytes per window of {n // w['windows']} pings: {w['ping']['db_bytes_per_window']} "
        f"(after the first window: {fmt(w['db_bytes_per_ping_after_first_window'])} bytes/ping).",
        f"In a transaction: ping -> {t['ping']}, transaction id {t['xid_assigned']}, "
        f"locks held: {', '.join(t['locks']) or 'none'}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", default=hosts.default_admin_dsn(), help="server (admin) URL")
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--connections", default="1,8")
    parser.add_argument("--wal-pings", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    args = parser.parse_args(argv)
    summary = asyncio.run(
        run(
            args.dsn,
            seconds=args.seconds,
            rounds=args.rounds,
            connections=tuple(int(x) for x in args.connections.split(",")),
            wal_pings=args.wal_pings,
        )
    )
    hosts.report("ping_cost", summary, argv, args.out, markdown)


if __name__ == "__main__":
    main()
