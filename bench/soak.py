"""Chaos soak: host processes, many names, a steady producer, and a stream of random faults.

    python bench/soak.py --faults 200            # on a throwaway cluster: every fault kind
    python bench/soak.py --dsn URL --faults 200  # on your server: no restart/half_open faults

Without ``--dsn`` the soak initdb's and starts its own PostgreSQL (``tests/cluster.py``), which it
may restart, and puts every host behind its own loopback TCP proxy (``tests/proxy.py``), which it
may freeze. With ``--dsn`` it only creates (and afterwards drops) a database there. Three
host processes (``tests/run_host.py``) serve ``--names`` names; a producer keeps inserting items
and pinging; every fault hits the owner of a name that has pending work, and the soak measures
the time from the fault to that name's next committed batch (by a new generation, except for
``kill_work``, where the same loop retries). At the end it drains, checks the invariants (no
item lost or processed twice, no overlapping batches, no generation going backwards) and prints
p50/p99/max per fault kind. Results also go to ``bench/results/soak-<time>.json``.

Fault kinds: ``sigkill`` (the owner process), ``sigstop`` (freeze the owner for longer than
``monitor_lag``, then SIGCONT it), ``kill_control`` (pg_terminate_backend of the owner's
lock/listen connection), ``kill_work`` (pg_terminate_backend of the owner's pool
connections); on its own cluster also ``restart`` (pg_ctl restart, fast or immediate,
measured from when the server is back) and ``half_open`` (the owner's proxy silently stops
forwarding, then resumes after the takeover).
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
from proxy import Proxy  # noqa: E402

KINDS = ("sigkill", "sigstop", "kill_control", "kill_work")
CLUSTER_KINDS = (*KINDS, "restart", "half_open")


@dataclass
class Fleet:
    dsn: str
    names: list[str]
    proxied: bool = False
    procs: dict[int, subprocess.Popen[str]] = field(default_factory=dict)
    proxies: dict[int, Proxy] = field(default_factory=dict)

    def spawn(self) -> subprocess.Popen[str]:
        proxy = None
        dsn = self.dsn
        if self.proxied:
            from urllib.parse import urlsplit

            proxy = Proxy(urlsplit(self.dsn).port or 5432)
            dsn = proxy.dsn(self.dsn)
        env = {
            **os.environ,
            "PYTHONPATH": str(TESTS),
            "JOBS_LIMIT": "5",
            "JOBS_SLEEP": "0.005",
            "JOBS_NAMES": ",".join(self.names),
        }
        proc = subprocess.Popen(
            [sys.executable, str(TESTS / "run_host.py"), dsn],
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
        if proxy is not None:
            self.proxies[proc.pid] = proxy
        return proc

    def retire(self, pid: int) -> None:
        self.procs.pop(pid).wait(10)
        proxy = self.proxies.pop(pid, None)
        if proxy is not None:
            proxy.close()

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(10)
        for proxy in self.proxies.values():
            proxy.close()


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def _producer(dsn: str, names: list[str], stop: asyncio.Event) -> None:
    """Insert and ping until stopped; every insert is also recorded in ``produced`` in the same
    transaction, so an insert whose commit acknowledgement a restart swallowed still counts."""
    rng = random.Random(7)
    conn: Any = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn)
            name = rng.choice(names)
            async with conn.transaction():
                await conn.execute(
                    "WITH i AS (INSERT INTO items (name) SELECT $1 FROM generate_series(1, $2)"
                    " RETURNING id) INSERT INTO produced SELECT id FROM i",
                    name,
                    rng.randint(1, 5),
                )
                await bl.ping(conn, name, jobs.next_items, jobs.process_items)
        except Exception:  # a restart can leave the connection in any state: start afresh
            if conn is not None:
                conn.terminate()
            conn = None
            await asyncio.sleep(0.1)
            continue
        await asyncio.sleep(rng.random() * 0.01)
    if conn is not None:
        await conn.close()


class Observer:
    """The soak's own connection, reopened whenever a restart drops it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: Any = None

    async def __call__(self, method: str, *args: Any) -> Any:
        for attempt in range(100):
            try:
                if self.conn is None or self.conn.is_closed():
                    self.conn = await asyncpg.connect(self.dsn)
                return await getattr(self.conn, method)(*args)
            except (
                OSError,
                asyncpg.PostgresConnectionError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                asyncpg.OperatorInterventionError,
            ):
                if self.conn is not None:
                    self.conn.terminate()
                self.conn = None
                if attempt == 99:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def _target(obs: Observer, fleet: Fleet) -> tuple[str, int, str, int] | None:
    """A name with pending work whose owner is one of our live processes."""
    rows = await obs(
        "fetch",
        """
        SELECT s.name, h.pid, h.host_id, s.generation
          FROM batchloop.worker_state s JOIN batchloop.hosts h ON h.host_id = s.owner_host
         WHERE EXISTS (SELECT 1 FROM items i WHERE i.name = s.name)
        """,
    )
    live = [r for r in rows if r["pid"] in fleet.procs and fleet.procs[r["pid"]].poll() is None]
    if not live:
        return None
    r = random.choice(live)
    return r["name"], r["pid"], r["host_id"], r["generation"]


_HOLDS_LOCK = (
    "EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory'"
    " AND l.mode = 'ExclusiveLock' AND l.granted)"
)


async def _inject(obs: Observer, kind: str, pid: int, host_id: str, fleet: Fleet) -> None:
    app = f"batchloop/{host_id}"
    if kind == "sigkill":
        os.kill(pid, signal.SIGKILL)
    elif kind == "sigstop":
        os.kill(pid, signal.SIGSTOP)
    elif kind == "half_open":
        fleet.proxies[pid].freeze()
    elif kind in ("kill_control", "kill_work"):
        which = _HOLDS_LOCK if kind == "kill_control" else f"NOT {_HOLDS_LOCK}"
        await obs(
            "execute",
            "SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a"
            f" WHERE a.application_name = $1 AND {which}",
            app,
        )


async def run(
    admin_dsn: str | None,
    *,
    faults: int,
    hosts: int = 3,
    names: int = 12,
    lag: float = 3.0,
    seed: int = 1,
    say: Any = print,
) -> dict[str, Any]:
    """Run the soak in a new database on ``admin_dsn``'s server, or, when it is None, on a
    throwaway cluster of its own (with every fault kind); returns the summary."""
    random.seed(seed)
    cluster = None
    if admin_dsn is None:
        from cluster import make_cluster

        cluster = make_cluster()
        admin_dsn = cluster.dsn
    dbname = f"blsoak_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    await admin.close()
    dsn = _with_db(admin_dsn, dbname)
    try:
        kinds = CLUSTER_KINDS if cluster is not None else KINDS
        return await _soak(dsn, faults, hosts, names, lag, kinds, say, cluster)
    finally:
        if cluster is not None:
            cluster.destroy()
        else:
            admin = await asyncpg.connect(admin_dsn)
            await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
            await admin.close()


def _with_db(dsn: str, dbname: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, "/" + dbname, parts.query, parts.fragment))


async def _soak(
    dsn: str,
    faults: int,
    hosts: int,
    n_names: int,
    lag: float,
    kinds: tuple[str, ...],
    say: Any,
    cluster: Any,
) -> dict[str, Any]:
    await bl.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    await jobs.create_tables(conn)
    await conn.execute("CREATE TABLE produced (item_id bigint PRIMARY KEY)")
    names = [f"soak{i}" for i in range(n_names)]
    config = bl.Config(monitor_lag=lag)
    for name in names:  # create every worker with the soak's monitor_lag
        async with conn.transaction():
            await bl.ping(conn, name, jobs.next_items, jobs.process_items, config=config)
    await conn.close()
    obs = Observer(dsn)
    fleet = Fleet(dsn, names, proxied=cluster is not None)
    stop = asyncio.Event()
    gaps: dict[str, list[float]] = {k: [] for k in kinds}
    missed: dict[str, int] = dict.fromkeys(kinds, 0)
    started = time.monotonic()
    try:
        for _ in range(hosts):
            fleet.spawn()
        producer = asyncio.create_task(_producer(dsn, names, stop))
        order: list[str] = []
        for i in range(faults):
            if not order:
                order = list(kinds)
                random.shuffle(order)
            kind = order.pop()
            target = None
            for _ in range(500):
                target = await _target(obs, fleet)
                if target is not None:
                    break
                await asyncio.sleep(0.02)
            if target is None:
                raise RuntimeError("no owned name with pending work to fault")
            name, pid, host_id, gen = target
            if kind == "restart":
                cluster.restart(random.choice(("fast", "immediate")))
            else:
                await _inject(obs, kind, pid, host_id, fleet)
            # A restart is measured from when the server is back; others from the fault.
            t0 = await obs("fetchval", "SELECT clock_timestamp()")
            newer = 0 if kind in ("kill_work", "restart") else gen
            gap = await _next_batch(obs, name, t0, newer, timeout=lag + 30)
            if gap is None:
                missed[kind] += 1
            else:
                gaps[kind].append(gap)
            if kind == "sigstop":
                os.kill(pid, signal.SIGCONT)
            elif kind == "half_open":
                fleet.proxies[pid].resume()
            elif kind == "sigkill":
                fleet.retire(pid)
                fleet.spawn()
            shown = "none" if gap is None else f"{gap:.3f}s"
            say(f"fault {i + 1}/{faults} {kind:12} {name:8} gap {shown}")
            await asyncio.sleep(random.uniform(0.05, 0.3))
        stop.set()
        await producer
        await _drained(obs, timeout=120)
        produced = int(await obs("fetchval", "SELECT count(*) FROM produced"))
        found = await violations(obs.conn, produced)
        left = int(await obs("fetchval", "SELECT count(*) FROM items"))
        batches = int(await obs("fetchval", "SELECT count(DISTINCT (name, started)) FROM done"))
    finally:
        stop.set()
        fleet.close()
        await obs.close()
    return {
        "faults": faults,
        "hosts": hosts,
        "names": n_names,
        "monitor_lag": lag,
        "seconds": round(time.monotonic() - started, 1),
        "items": produced,
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


async def _next_batch(
    obs: Observer, name: str, t0: Any, newer_than: int, timeout: float
) -> float | None:
    """Seconds from ``t0`` to the first batch of ``name`` committed after it by a generation
    above ``newer_than``; None if none came within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        first = await obs(
            "fetchval",
            "SELECT min(finished) FROM done WHERE name = $1 AND finished > $2 AND generation > $3",
            name,
            t0,
            newer_than,
        )
        if first is not None:
            return float((first - t0).total_seconds())
        await asyncio.sleep(0.01)
    return None


async def _drained(obs: Observer, timeout: float) -> None:
    """Poll (the items table has no event to wait on) until it is empty or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not await obs("fetchval", "SELECT count(*) FROM items"):
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
    parser.add_argument(
        "--dsn",
        default=None,
        help="a server to create the soak's database on (default: a throwaway cluster)",
    )
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
