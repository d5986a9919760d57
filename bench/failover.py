"""Failover after SIGKILL: three host processes, kill the owner, time to the next batch.

    python bench/failover.py --trials 20

Three hosts (``hosts.py``) serve one name while a producer keeps inserting a row and pinging
every few milliseconds, so the loop always has work. Each trial reads the database clock, sends
SIGKILL to the process that owns the name, and measures the time to the first batch of a newer
generation: by the database clock (``clock_timestamp()`` in that batch's worker statement,
just before its commit) and as this process first sees it committed (polling every 5 ms, on
its monotonic clock). The killed host is replaced, so every trial starts with three, and a
random pause between trials varies the phase against the hosts' monitor ticks.

Prints a markdown table and writes ``bench/results/failover-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from typing import Any

import asyncpg
import hosts
from hosts import Fleet, bench_database, dist, fmt, host_args

import batchloop as bl

NAME = "failover"
GOAL_P99_S = 1.0

_OWNER = """
SELECT h.pid, s.generation
  FROM batchloop.worker_state s JOIN batchloop.hosts h ON h.host_id = s.owner_host
 WHERE s.name = $1
   AND EXISTS (SELECT 1 FROM bench_done d WHERE d.name = s.name AND d.generation = s.generation
                  AND d.at > clock_timestamp() - interval '1 second')
"""


async def _producer(dsn: str, stop: asyncio.Event, every: float) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            await hosts.ping_items(conn, NAME)
            await asyncio.sleep(every)
    finally:
        await conn.close()


async def run(
    admin_dsn: str,
    *,
    trials: int = 20,
    n_hosts: int = 3,
    every: float = 0.005,
    monitor_interval: float = 0.5,
    seed: int = 1,
    verbose: bool = False,
    say: Any = print,
) -> dict[str, Any]:
    rng = random.Random(seed)
    gaps_db: list[float] = []
    gaps_seen: list[float] = []
    detail: list[dict[str, Any]] = []
    missed = 0
    async with bench_database(admin_dsn, "failover") as dsn:
        fleet = Fleet(dsn, verbose=verbose)
        obs = await asyncpg.connect(dsn)
        stop = asyncio.Event()
        producer = None
        knobs = host_args(limit=5, monitor_interval=monitor_interval)
        try:
            for _ in range(n_hosts):
                await fleet.spawn("host", *knobs)
            async with obs.transaction():
                await bl.ping(obs, NAME, hosts.bench_query, hosts.bench_worker)
            producer = asyncio.create_task(_producer(dsn, stop, every))
            for trial in range(trials):
                owner = await _steady_owner(obs, fleet)
                pid, gen = owner["pid"], owner["generation"]
                victim = fleet.procs[pid]
                t0 = await obs.fetchval("SELECT clock_timestamp()")
                m0 = time.monotonic()
                victim.proc.kill()
                first = None
                while time.monotonic() - m0 < 30:
                    first = await obs.fetchrow(
                        "SELECT at, host_pid FROM bench_done WHERE name = $1 AND generation > $2"
                        " AND at > $3 ORDER BY at LIMIT 1",
                        NAME,
                        gen,
                        t0,
                    )
                    if first is not None:
                        break
                    await asyncio.sleep(0.005)
                seen = time.monotonic() - m0
                await fleet.kill(victim)  # reap it
                if first is None:
                    missed += 1
                    say(f"trial {trial + 1}/{trials}: no batch within 30 s")
                else:
                    gap = (first["at"] - t0).total_seconds()
                    gaps_db.append(gap)
                    gaps_seen.append(seen)
                    detail.append({"gap_db": gap, "seen": seen, "new_owner": first["host_pid"]})
                    say(f"trial {trial + 1}/{trials}: batch after {gap:.3f} s (seen {seen:.3f} s)")
                await fleet.spawn("host", *knobs)
                await asyncio.sleep(rng.uniform(0.2, 0.2 + monitor_interval))
        finally:
            stop.set()
            if producer is not None:
                await producer
            await fleet.close()
            await obs.close()
    summary = {
        "scenario": "failover",
        "trials": trials,
        "hosts": n_hosts,
        "monitor_interval": monitor_interval,
        "missed": missed,
        "to_batch_db_clock": dist(gaps_db, scale=1.0),
        "to_batch_seen": dist(gaps_seen, scale=1.0),
        "trials_detail": detail,
        "provenance": hosts.provenance(),
    }
    p99 = summary["to_batch_db_clock"]["p99"]
    summary["goals"] = {
        "failover_p99_s": {
            "goal": GOAL_P99_S,
            "measured": p99,
            "met": p99 is not None and p99 <= GOAL_P99_S and missed == 0,
        }
    }
    return summary


async def _steady_owner(obs: Any, fleet: Fleet, timeout: float = 30.0) -> Any:
    """The live host process that owns the name and has committed a batch in the last second."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await obs.fetchrow(_OWNER, NAME)
        if row is not None and row["pid"] in fleet.procs and fleet.procs[row["pid"]].alive:
            return row
        await asyncio.sleep(0.02)
    raise TimeoutError("no live host owns the name and runs batches")


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| SIGKILL of the owner to the next committed batch (s) | n | p50 | p95 | p99 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("to_batch_db_clock", "database clock (batch's worker statement)"),
        ("to_batch_seen", "seen committed by the observer (5 ms polls)"),
    ):
        d = summary[key]
        lines.append(
            f"| {label} | {d['n']} | {fmt(d['p50'])} | {fmt(d['p95'])} | {fmt(d['p99'])} | "
            f"{fmt(d['max'])} |"
        )
    g = summary["goals"]["failover_p99_s"]
    lines += [
        "",
        f"{summary['trials']} trials, {summary['hosts']} hosts, monitor_interval "
        f"{summary['monitor_interval']} s, missed {summary['missed']}. Goal p99 <= "
        f"{g['goal']} s: {g['measured']} ({'met' if g['met'] else 'NOT met'}).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", default=hosts.default_admin_dsn(), help="server (admin) URL")
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--monitor-interval", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    hosts.output_options(parser)
    args = parser.parse_args(argv)
    summary = asyncio.run(
        run(
            args.dsn,
            trials=args.trials,
            n_hosts=args.hosts,
            monitor_interval=args.monitor_interval,
            seed=args.seed,
            verbose=args.verbose,
            say=hosts.say(args),
        )
    )
    hosts.report("failover", summary, argv, args.out, markdown)


if __name__ == "__main__":
    main()
