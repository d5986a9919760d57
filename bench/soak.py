"""Chaos soak: host processes, many names, a steady producer, and a stream of random faults.

    python bench/soak.py --dsn postgresql://root@127.0.0.1:5432/postgres --faults 200

The DSN names a server where the soak may create (and afterwards drop) its own database. Three
host processes (``tests/run_host.py``) serve ``--names`` names; a producer keeps inserting items
and pinging; every fault hits the owner of a name that has pending work, and the soak measures
the time from the fault to that name's next committed batch (by a new generation, except for
``kill_work``, where the same loop retries). At the end it drains, checks the invariants (no
item lost or processed twice, no overlapping batches, no generation going backwards) and prints
p50/p99/max per fault kind. Results also go to ``bench/results/soak-<time>.json``.

Fault kinds: ``sigkill`` (the owner process), ``sigstop`` (freeze the owner for longer than
``monitor_lag``, then SIGCONT it), ``kill_control`` (pg_terminate_backend of the owner's
lock/listen connection), ``kill_work`` (pg_terminate_backend of the owner's pool connections).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))

import batchloop as bl  # noqa: E402

import jobs  # noqa: E402
from invariants import violations  # noqa: E402

KINDS = ("sigkill", "sigstop", "kill_control", "kill_work")


@dataclass
class Fleet:
    dsn: str
    names: list[str]
    procs: dict[int, subprocess.Popen[str]] = field(default_factory=dict)

    def spawn(self) -> subprocess.Popen[str]:
        env = {
            **os.environ,
            "PYTHONPATH": str(TESTS),
            "JOBS_LIMIT": "5",
            "JOBS_SLEEP": "0.005",
            "JOBS_NAMES": ",".join(self.names),
        }
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / "run_host.py"), self.dsn],
            cwd=TESTS,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"host process failed to start: {line!r}")
        self.procs[proc.pid] = proc
        return proc

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(10)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def _producer(dsn: str, names: list[str], stop: asyncio.Event, counter: list[int]) -> None:
    rng = random.Random(7)
    conn = await asyncpg.connect(dsn)
    try:
        while not stop.is_set():
            name = rng.choice(names)
            count = rng.randint(1, 5)
            async with conn.transaction():
                await conn.execute(
                    "INSERT INTO items (name) SELECT $1 FROM generate_series(1, $2)", name, count
                )
                await bl.ping(conn, name, jobs.next_items, jobs.process_items)
            counter[0] += count
            await asyncio.sleep(rng.random() * 0.01)
    finally:
        await conn.close()


async def _target(conn: Any, fleet: Fleet) -> tuple[str, int, str, int] | None:
    """A name with pending work whose owner is one of our live processes."""
    rows = await conn.fetch(
        """
        SELECT s.name, h.pid, h.host_id, s.generation
          FROM batchloop.worker_state s JOIN batchloop.hosts h ON h.host_id = s.owner_host
         WHERE EXISTS (SELECT 1 FROM items i WHERE i.name = s.name)
        """
    )
    live = [r for r in rows if r["pid"] in fleet.procs and fleet.procs[r["pid"]].poll() is None]
    if not live:
        return None
    r = random.choice(live)
    return r["name"], r["pid"], r["host_id"], r["generation"]


async def _inject(conn: Any, kind: str, pid: int, host_id: str) -> None:
    app = f"batchloop/{host_id}"
    if kind == "sigkill":
        os.kill(pid, signal.SIGKILL)
    elif kind == "sigstop":
        os.kill(pid, signal.SIGSTOP)
    elif kind == "kill_control":
        await conn.execute(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a WHERE a.application_name"
            " = $1 AND EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND"
            " l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted)",
            app,
        )
    elif kind == "kill_work":
        await conn.execute(
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a WHERE a.application_name"
            " = $1 AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND"
            " l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted)",
            app,
        )


async def run(
    admin_dsn: str,
    *,
    faults: int,
    hosts: int = 3,
    names: int = 12,
    lag: float = 3.0,
    seed: int = 1,
    kinds: tuple[str, ...] = KINDS,
    say: Any = print,
) -> dict[str, Any]:
    """Create a database, run the soak in it, drop it; returns the summary."""
    random.seed(seed)
    dbname = f"blsoak_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    dsn = _with_db(admin_dsn, dbname)
    try:
        return await _soak(dsn, faults, hosts, names, lag, kinds, say)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()


def _with_db(dsn: str, dbname: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


async def _soak(
    dsn: str, faults: int, hosts: int, n_names: int, lag: float, kinds: tuple[str, ...], say: Any
) -> dict[str, Any]:
    await bl.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await jobs.create_tables(conn)
    names = [f"soak{i}" for i in range(n_names)]
    config = bl.Config(monitor_lag=lag)
    for name in names:  # create every worker with the soak's monitor_lag
        async with conn.transaction():
            await bl.ping(conn, name, jobs.next_items, jobs.process_items, config=config)
    fleet = Fleet(dsn, names)
    stop = asyncio.Event()
    inserted = [0]
    gaps: dict[str, list[float]] = {k: [] for k in kinds}
    missed: dict[str, int] = dict.fromkeys(kinds, 0)
    started = time.monotonic()
    try:
        for _ in range(hosts):
            fleet.spawn()
        producer = asyncio.create_task(_producer(dsn, names, stop, inserted))
        order: list[str] = []
        for i in range(faults):
            if not order:
                order = list(kinds)
                random.shuffle(order)
            kind = order.pop()
            target = None
            for _ in range(200):
                target = await _target(conn, fleet)
                if target is not None:
                    break
                await asyncio.sleep(0.02)
            if target is None:
                raise RuntimeError("no owned name with pending work to fault")
            name, pid, host_id, gen = target
            t0 = await conn.fetchval("SELECT clock_timestamp()")
            await _inject(conn, kind, pid, host_id)
            newer = 0 if kind == "kill_work" else gen
            gap = await _next_batch(conn, name, t0, newer, timeout=lag + 30)
            if gap is None:
                missed[kind] += 1
            else:
                gaps[kind].append(gap)
            if kind == "sigstop":
                os.kill(pid, signal.SIGCONT)
            if kind == "sigkill":
                fleet.procs.pop(pid).wait(10)
                fleet.spawn()
            shown = "none" if gap is None else f"{gap:.3f}s"
            say(f"fault {i + 1}/{faults} {kind:12} {name:8} gap {shown}")
            await asyncio.sleep(random.uniform(0.05, 0.3))
        stop.set()
        await producer
        await _drained(conn, timeout=120)
        found = await violations(conn, inserted[0])
        left = int(await conn.fetchval("SELECT count(*) FROM items"))
        batches = int(await conn.fetchval("SELECT count(DISTINCT (name, started)) FROM done"))
    finally:
        stop.set()
        fleet.close()
        await conn.close()
    summary: dict[str, Any] = {
        "faults": faults,
        "hosts": hosts,
        "names": n_names,
        "monitor_lag": lag,
        "seconds": round(time.monotonic() - started, 1),
        "items": inserted[0],
        "batches": batches,
        "left_unprocessed": left,
        "violations": found,
        "kinds": {
            k: {
                "count": len(v) + missed[k],
                "missed": missed[k],
                "p50": round(percentile(v, 50), 3) if v else None,
                "p99": round(percentile(v, 99), 3) if v else None,
                "max": round(max(v), 3) if v else None,
            }
            for k, v in gaps.items()
        },
    }
    return summary


async def _next_batch(
    conn: Any, name: str, t0: Any, newer_than: int, timeout: float
) -> float | None:
    """Seconds from ``t0`` to the first batch of ``name`` committed after it by a generation
    above ``newer_than``; None if none came within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first = await conn.fetchval(
            "SELECT min(finished) FROM done WHERE name = $1 AND finished > $2 AND generation > $3",
            name,
            t0,
            newer_than,
        )
        if first is not None:
            return float((first - t0).total_seconds())
        await asyncio.sleep(0.01)
    return None


async def _drained(conn: Any, timeout: float) -> None:
    """Poll (the items table has no event to wait on) until it is empty or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await conn.fetchval("SELECT count(*) FROM items"):
            return
        await asyncio.sleep(0.1)


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| fault | count | missed | p50 s | p99 s | max s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind, s in summary["kinds"].items():
        lines.append(
            f"| {kind} | {s['count']} | {s['missed']} | {s['p50']} | {s['p99']} | {s['max']} |"
        )
    v = summary["violations"]
    lines.append("")
    lines.append(
        f"{summary['faults']} faults, {summary['hosts']} hosts, {summary['names']} names, "
        f"monitor_lag {summary['monitor_lag']} s, {summary['seconds']} s; "
        f"{summary['items']} items in {summary['batches']} batches, "
        f"{summary['left_unprocessed']} left; violations: lost {v['lost']}, duplicated "
        f"{v['duplicated']}, overlapping {v['overlapping']}, backwards {v['backwards']}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL", "postgresql:///postgres"))
    parser.add_argument("--faults", type=int, default=200)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--names", type=int, default=12)
    parser.add_argument("--lag", type=float, default=3.0, help="monitor_lag of every name")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    say = (lambda *_a: None) if args.quiet else print
    summary = asyncio.run(
        run(
            args.dsn,
            faults=args.faults,
            hosts=args.hosts,
            names=args.names,
            lag=args.lag,
            seed=args.seed,
            say=say,
        )
    )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(summary, indent=2))
    print(markdown(summary))
    print(f"(written to {path.relative_to(ROOT)})")
    with contextlib.suppress(Exception):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
