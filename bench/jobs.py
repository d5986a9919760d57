"""Jobs benchmarks: ``batchloop.jobs`` against pgqueuer and procrastinate, and against SQL.

    python bench/jobs.py throughput [--jobs 10000] [--concurrency 10,100] [--runs 3]
    python bench/jobs.py dispatch [--jobs 4000] [--connections 1,8] [--runs 3]
    python bench/jobs.py latency [--samples 100] [--busy-rate 500] [--runs 1]
    python bench/jobs.py all --jobs 200 --samples 3 --runs 1 --quiet    # the smoke test's size

Every trial gets a brand-new database ``bench_jobs_*`` on the server of ``--dsn`` (default
``DATABASE_URL``, else ``postgresql://127.0.0.1:5432/postgres``) and runs in a subprocess of its
own (no system inherits another's event loop, pools or garbage); the database is dropped
afterwards. Rounds alternate the systems (``--runs`` rounds); the report gives medians, min and
max, and ratios of medians from the same invocation. Results (every trial, the summary, the
machine, package versions) go to ``bench/results/jobs-<scenario>-<UTC time>.json``.

Scenarios:

* ``throughput``: ``--jobs`` no-op jobs dispatched beforehand (timed apart: ``enqueue``), then
  run until every one is completed, at the same concurrency C for every system (each of
  ``--concurrency``; procrastinate runs at most 20, since its pool needs C + 1 connections,
  and at most ``--procrastinate-jobs`` jobs: it is an order of magnitude slower):

  - ``batchloop``: ``@jobs.job("bench.noop", queue="bench", concurrency=C)``, dispatched with
    ``dispatch_many`` in chunks of 5,000 before any host runs; the clock starts as the ``Host``
    starts (its start-up, a few milliseconds, is inside the figure) and stops when a poll
    (every 10 ms, on a connection of its own) counts ``--jobs`` completed jobs.
  - ``pgqueuer``: ``bench/peers/pgqueuer_peer.py`` (as in the drain benchmark: its performance
    guide's settings, drain mode), with ``batch_size = C`` and the entrypoint's
    ``concurrency_limit = C``.
  - ``procrastinate``: ``bench/peers/procrastinate_peer.py`` with ``concurrency = min(C, 20)``
    (``delete_jobs="always"``, ``wait=False``).

  The peers delete (procrastinate) or move (pgqueuer, to its log table) finished jobs; batchloop
  keeps them as ``completed`` rows until their retention ends, which is more work, not less.
* ``dispatch``: ``--jobs`` jobs created one transaction each, spread over 1 and 8 connections
  (``--connections``), as ``await noop.dispatch(conn, payload)`` (pydantic validation, the
  insert and the queue's ``ping``), against a plain ``INSERT INTO plain_jobs (payload) VALUES
  ($1)`` of the same JSON into a table with a bigserial key and a timestamp. No host runs, so
  the queue's loop stays ``running`` and each ``ping`` is the cheap no-op it is while a busy
  queue works (the first dispatch's wake-up is the only write).
* ``latency``: a host in its own process runs ``bench.stamp`` (at the first ``--concurrency``),
  whose handler returns ``time.monotonic()`` as its first act; this process dispatches one job,
  reads the same clock right after COMMIT returns and polls ``jobs.get`` until the job is
  completed. Latency = handler start - commit (CLOCK_MONOTONIC is one clock for every process
  on a machine, so the server, producer and host must share it: the script runs both locally).
  ``idle``: one job at a time, each after the queue went idle (``--gap`` seconds after the
  previous job finished);
  ``busy``: the same while another connection dispatches ``--busy-rate`` no-op jobs per second
  into the same queue.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import statistics
import subprocess
import sys
import time
from importlib import import_module
from pathlib import Path
from typing import Any

import asyncpg

HERE = Path(__file__).resolve().parent
SCRIPT = str(Path(__file__).resolve())
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import batchloop as bl  # noqa: E402

SCENARIOS = ("throughput", "dispatch", "latency")
THROUGHPUT_SYSTEMS = ("batchloop", "pgqueuer", "procrastinate")
DISPATCH_SYSTEMS = ("insert", "dispatch")
LATENCY_VARIANTS = ("idle", "busy")
PEERS = {"pgqueuer": "peers.pgqueuer_peer", "procrastinate": "peers.procrastinate_peer"}
DISPATCH_CHUNK = 5_000
PROCRASTINATE_MAX_CONCURRENCY = 20
POLL = 0.01


# --------------------------------------------------------------------------------------------
# trials, each in its own process (they import jobs_noop: the orchestrator needs no jobs)


def _defs() -> Any:
    return import_module("jobs_noop")


async def count_completed(conn: asyncpg.Connection) -> int:
    # One table read: list_jobs has a limit and would make the poll grow with the backlog.
    return int(
        await conn.fetchval("SELECT count(*) FROM batchloop.jobs WHERE status = 'completed'")
    )


async def trial_throughput_batchloop(dsn: str, n: int, concurrency: int) -> dict[str, Any]:
    d = _defs()
    await bl.migrate(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        started = time.perf_counter()
        for offset in range(0, n, DISPATCH_CHUNK):
            k = min(DISPATCH_CHUNK, n - offset)
            async with conn.transaction():
                await d.noop.dispatch_many(conn, [d.Noop(n=offset + i) for i in range(k)])
        enqueue_s = time.perf_counter() - started
        import peers.common

        await peers.common.settle(dsn, "batchloop.jobs")
        started = time.perf_counter()
        async with bl.Host(dsn):
            while await count_completed(conn) < n:  # noqa: ASYNC110 - the database's count
                await asyncio.sleep(POLL)
            run_s = time.perf_counter() - started
        left = int(
            await conn.fetchval("SELECT count(*) FROM batchloop.jobs WHERE status <> 'completed'")
        )
    finally:
        await conn.close()
    return {
        "enqueue_s": enqueue_s,
        "run_s": run_s,
        "remaining": left,
        "settings": {
            "concurrency": concurrency,
            "dispatch": f"dispatch_many, {DISPATCH_CHUNK} a transaction",
            "host": "Host defaults",
            "end": f"poll count(completed) every {POLL * 1000:.0f} ms",
        },
    }


async def trial_throughput_peer(system: str, dsn: str, n: int, concurrency: int) -> dict[str, Any]:
    peer = import_module(PEERS[system])
    options = {
        "pgq_workers": 1,
        "pgq_concurrency_limit": concurrency,
        "procrastinate_max_concurrency": min(concurrency, PROCRASTINATE_MAX_CONCURRENCY),
    }
    result: dict[str, Any] = await peer.trial(dsn, n, concurrency, options)
    result["run_s"] = result.pop("drain_s")
    return result


async def trial_dispatch(dsn: str, system: str, n: int, connections: int) -> dict[str, Any]:
    d = _defs()
    await bl.migrate(dsn)
    conns = [await asyncpg.connect(dsn) for _ in range(connections)]
    try:
        await conns[0].execute(
            "CREATE TABLE plain_jobs (id bigserial PRIMARY KEY, payload jsonb NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now())"
        )
        per = [n // connections + (1 if i < n % connections else 0) for i in range(connections)]

        async def producer(conn: asyncpg.Connection, count: int, base: int) -> None:
            for i in range(count):
                if system == "dispatch":
                    async with conn.transaction():
                        await d.noop.dispatch(conn, d.Noop(n=base + i))
                else:
                    async with conn.transaction():
                        await conn.execute(
                            "INSERT INTO plain_jobs (payload) VALUES ($1::jsonb)",
                            json.dumps({"n": base + i}),
                        )

        # A first one apart, so that the clock never includes the queue's creation.
        await producer(conns[0], 1, -1)
        started = time.perf_counter()
        await asyncio.gather(
            *(producer(c, k, sum(per[:i])) for i, (c, k) in enumerate(zip(conns, per, strict=True)))
        )
        elapsed = time.perf_counter() - started
        table = "batchloop.jobs" if system == "dispatch" else "plain_jobs"
        made = int(await conns[0].fetchval(f"SELECT count(*) FROM {table}")) - 1
    finally:
        for c in conns:
            await c.close()
    return {
        "elapsed_s": elapsed,
        "made": made,
        "settings": {"connections": connections, "transaction": "one per job", "host": "none"},
    }


def host_main(dsn: str) -> None:
    """The latency scenario's host: runs until its stdin closes."""
    _defs()

    async def run() -> None:
        async with bl.Host(dsn):
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(run())


async def trial_latency(
    dsn: str, variant: str, samples: int, gap: float, busy_rate: float
) -> dict[str, Any]:
    await bl.migrate(dsn)
    d = _defs()
    host = await asyncio.create_subprocess_exec(
        sys.executable,
        SCRIPT,
        "--host-process",
        dsn,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=HERE,
    )
    conn = await asyncpg.connect(dsn)
    busy_conn = await asyncpg.connect(dsn)
    stop = asyncio.Event()
    busy_made = 0

    async def busy() -> None:
        nonlocal busy_made
        tick = 0.01
        per_tick = max(1, round(busy_rate * tick))
        while not stop.is_set():
            async with busy_conn.transaction():
                await d.noop.dispatch_many(busy_conn, [d.Noop() for _ in range(per_tick)])
            busy_made += per_tick
            await asyncio.sleep(tick)

    latencies: list[float] = []
    try:
        assert host.stdout is not None
        line = await asyncio.wait_for(host.stdout.readline(), 60)
        if line.strip() != b"ready":
            raise RuntimeError(f"the host process did not start: {line!r}")
        # The queue exists, and the host has run one job, before the clock means anything.
        async with conn.transaction():
            first = await d.stamp.dispatch(conn, d.Noop(n=-1))
        await wait_completed(conn, first)
        feeder = asyncio.create_task(busy()) if variant == "busy" else None
        if feeder is not None:
            await asyncio.sleep(1.0)  # the stream reaches its rate before the first sample
        for i in range(samples):
            if variant == "idle":
                await asyncio.sleep(gap)
            else:
                await asyncio.sleep(random.uniform(0.0, 0.02))  # not in step with the feeder
            async with conn.transaction():
                job_id = await d.stamp.dispatch(conn, d.Noop(n=i))
            committed = time.monotonic()
            run = await wait_completed(conn, job_id)
            assert run.result is not None
            latencies.append(run.result["started"] - committed)
        stop.set()
        if feeder is not None:
            await feeder
    finally:
        stop.set()
        await conn.close()
        await busy_conn.close()
        if host.stdin is not None:
            host.stdin.close()
        try:
            await asyncio.wait_for(host.wait(), 20)
        except (TimeoutError, asyncio.TimeoutError):  # one class from 3.11 on
            host.kill()
            await host.wait()
    return {
        "latencies_ms": [x * 1000 for x in latencies],
        "busy_jobs": busy_made,
        "settings": {
            "concurrency": d.CONCURRENCY,
            "gap_s": gap if variant == "idle" else None,
            "busy_rate": busy_rate if variant == "busy" else None,
            "host": "Host defaults, its own process",
        },
    }


async def wait_completed(conn: asyncpg.Connection, job_id: int, timeout: float = 60.0) -> Any:
    import batchloop.jobs as jobs

    deadline = time.monotonic() + timeout
    while True:
        run = await jobs.get(conn, job_id)
        if run is not None and run.status == "completed":
            return run
        if run is not None and run.status in ("failed", "canceled"):
            raise RuntimeError(f"job {job_id} ended {run.status}: {run.error}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not completed after {timeout} s")
        await asyncio.sleep(0.002)


async def run_trial(spec: dict[str, Any]) -> dict[str, Any]:
    scenario, dsn = spec["scenario"], spec["dsn"]
    if scenario == "throughput":
        if spec["system"] == "batchloop":
            return await trial_throughput_batchloop(dsn, spec["jobs"], spec["concurrency"])
        return await trial_throughput_peer(spec["system"], dsn, spec["jobs"], spec["concurrency"])
    if scenario == "dispatch":
        return await trial_dispatch(dsn, spec["system"], spec["jobs"], spec["connections"])
    return await trial_latency(dsn, spec["system"], spec["samples"], spec["gap"], spec["busy_rate"])


# --------------------------------------------------------------------------------------------
# the orchestrator


def run_one(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    drain = import_module("drain")
    record: dict[str, Any] = dict(spec)
    concurrency = spec.get("concurrency", args.concurrency_list[0])
    env = {**os.environ, "BENCH_JOBS_CONCURRENCY": str(concurrency)}
    drain.trial_in_subprocess(
        args.dsn, "bench_jobs", SCRIPT, spec, record, args.trial_timeout, env=env
    )
    if "error" in record:
        return record
    if spec["scenario"] == "throughput":
        record["jobs_per_s"] = spec["jobs"] / record["run_s"]
        if record.get("remaining"):
            record["error"] = f"{record['remaining']} of {spec['jobs']} jobs not completed"
    elif spec["scenario"] == "dispatch":
        record["jobs_per_s"] = spec["jobs"] / record["elapsed_s"]
        if record["made"] != spec["jobs"]:
            record["error"] = f"made {record['made']} of {spec['jobs']} rows"
    return record


def specs(args: argparse.Namespace, scenario: str) -> list[dict[str, Any]]:
    """One round's trials, in the order they alternate."""
    if scenario == "throughput":
        return [
            {
                "scenario": scenario,
                "system": s,
                "jobs": min(args.jobs, args.procrastinate_jobs)
                if s == "procrastinate"
                else args.jobs,
                "concurrency": c,
            }
            for c in args.concurrency_list
            for s in args.system_list
        ]
    if scenario == "dispatch":
        return [
            {"scenario": scenario, "system": s, "jobs": args.dispatch_jobs, "connections": c}
            for c in args.connection_list
            for s in DISPATCH_SYSTEMS
        ]
    return [
        {
            "scenario": scenario,
            "system": v,
            "samples": args.samples,
            "gap": args.gap,
            "busy_rate": args.busy_rate,
        }
        for v in LATENCY_VARIANTS
    ]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarise(scenario: str, trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for t in trials:
        # The group: connections (dispatch) or concurrency (throughput), whichever applies.
        key = (t["system"], t.get("connections") or t.get("concurrency"))
        groups.setdefault(key, []).append(t)
    out = []
    side = {"dispatch": "connections", "throughput": "concurrency"}.get(scenario)
    for (system, group_by), group in groups.items():
        ok = [t for t in group if "error" not in t]
        entry: dict[str, Any] = {
            "system": system,
            "runs": len(ok),
            "errors": len(group) - len(ok),
        }
        if side is not None:
            entry[side] = group_by
        if scenario == "latency":
            values = [x for t in ok for x in t["latencies_ms"]]
            if values:
                entry.update(
                    samples=len(values),
                    p50_ms=statistics.median(values),
                    p90_ms=pct(values, 0.9),
                    p99_ms=pct(values, 0.99),
                    max_ms=max(values),
                )
        else:
            rates = [t["jobs_per_s"] for t in ok]
            if rates:
                entry.update(median=statistics.median(rates), min=min(rates), max=max(rates))
                enqueue = [t["jobs"] / t["enqueue_s"] for t in ok if t.get("enqueue_s")]
                if enqueue:
                    entry["enqueue_median"] = statistics.median(enqueue)
        out.append(entry)
    # Ratios of medians: throughput to pgqueuer (the yardstick), dispatch to INSERT.
    base_of = {"throughput": "pgqueuer", "dispatch": "insert"}.get(scenario)
    if base_of is not None:
        assert side is not None
        medians = {(e["system"], e[side]): e.get("median") for e in out}
        for e in out:
            base = medians.get((base_of, e[side]))
            if base and "median" in e:
                e["baseline"], e["ratio"] = base_of, e["median"] / base
    return out


def markdown(scenario: str, summary: list[dict[str, Any]]) -> str:
    def rate(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f}"

    def runs(e: dict[str, Any]) -> str:
        return f"{e['runs']}" + (f" ({e['errors']} failed)" if e["errors"] else "")

    lines = []
    if scenario == "latency":
        lines += [
            "| queue | samples | p50 ms | p90 ms | p99 ms | max ms |",
            "|---|--:|--:|--:|--:|--:|",
        ]
        for e in summary:
            if "p50_ms" not in e:
                lines.append(f"| {e['system']} | - ({e['errors']} failed) | | | | |")
                continue
            lines.append(
                f"| {e['system']} | {e['samples']} | {e['p50_ms']:.1f} | {e['p90_ms']:.1f} "
                f"| {e['p99_ms']:.1f} | {e['max_ms']:.1f} |"
            )
        return "\n".join(lines) + "\n"
    side = "connections" if scenario == "dispatch" else "concurrency"
    lines.append(f"| {side} | system | runs | median jobs/s | min | max | ratio | enqueue jobs/s |")
    lines.append("|--:|---|--:|--:|--:|--:|--:|--:|")
    for e in summary:
        ratio = f"{e['ratio']:.2f}x {e['baseline']}" if "ratio" in e else "-"
        conn = f"{e[side]} | "
        lines.append(
            f"| {conn}{e['system']} | {runs(e)} | {rate(e.get('median'))} | {rate(e.get('min'))} "
            f"| {rate(e.get('max'))} | {ratio} | {rate(e.get('enqueue_median'))} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", nargs="?", choices=(*SCENARIOS, "all"), default="all")
    p.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    p.add_argument("--jobs", type=int, default=10_000, help="throughput: jobs per trial")
    p.add_argument("--dispatch-jobs", type=int, default=None, help="dispatch: default --jobs/5")
    p.add_argument(
        "--concurrency", default="10,100", help="throughput: each for every system (10,100)"
    )
    p.add_argument("--procrastinate-jobs", type=int, default=5_000, help="its cap (5000)")
    p.add_argument("--systems", default=",".join(THROUGHPUT_SYSTEMS))
    p.add_argument("--connections", default="1,8", help="dispatch: producer connections")
    p.add_argument("--samples", type=int, default=100, help="latency: samples per variant")
    p.add_argument("--gap", type=float, default=3.0, help="latency idle: seconds between jobs")
    p.add_argument("--busy-rate", type=float, default=500.0, help="latency busy: jobs/s")
    p.add_argument("--runs", type=int, default=3, help="rounds; every system once a round")
    p.add_argument("--trial-timeout", type=float, default=900)
    p.add_argument("--json", type=Path, help="directory for the results (default bench/results)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--trial", help=argparse.SUPPRESS)
    p.add_argument("--host-process", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dsn = args.dsn or "postgresql://127.0.0.1:5432/postgres"
    if not args.dsn.startswith(("postgresql://", "postgres://")):
        raise SystemExit("--dsn must be a postgresql:// URL")
    args.system_list = [s for s in args.systems.split(",") if s]
    unknown = set(args.system_list) - set(THROUGHPUT_SYSTEMS)
    if unknown or not args.system_list:
        raise SystemExit(f"unknown systems {sorted(unknown)}; choose from {THROUGHPUT_SYSTEMS}")
    args.connection_list = [int(c) for c in args.connections.split(",") if c]
    args.concurrency_list = [int(c) for c in args.concurrency.split(",") if c]
    if args.dispatch_jobs is None:
        args.dispatch_jobs = max(max(args.connection_list), args.jobs // 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.host_process is not None:
        host_main(args.host_process)
        return 0
    if args.trial is not None:
        print(json.dumps(asyncio.run(run_trial(json.loads(args.trial)))), flush=True)
        return 0
    drain = import_module("drain")

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    failed = 0
    out_dir = args.json or RESULTS
    machine = drain.machine(args.dsn)
    for scenario in SCENARIOS if args.scenario == "all" else (args.scenario,):
        started = dt.datetime.now(dt.timezone.utc)
        trials: list[dict[str, Any]] = []
        for rnd in range(args.runs):
            for spec in specs(args, scenario):
                record = run_one(args, spec)
                record["round"] = rnd
                trials.append(record)
                what = f"{scenario} {spec['system']}" + (
                    f" x{spec['connections']}" if "connections" in spec else ""
                )
                if "error" in record:
                    say(f"[round {rnd}] {what}: FAILED {record['error']}")
                elif "jobs_per_s" in record:
                    say(f"[round {rnd}] {what}: {record['jobs_per_s']:,.0f} jobs/s")
                else:
                    p50 = statistics.median(record["latencies_ms"])
                    say(f"[round {rnd}] {what}: p50 {p50:.1f} ms")
        summary = summarise(scenario, trials)
        meta = {
            "scenario": scenario,
            "started": started.isoformat(timespec="seconds"),
            "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/jobs.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "runs": args.runs,
            "concurrency": args.concurrency_list,
            "machine": machine,
        }
        path = out_dir / f"jobs-{scenario}-{started:%Y%m%d-%H%M%S}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "summary": summary, "trials": trials}, indent=1))
        print(f"### {scenario}\n\n{markdown(scenario, summary)}\nJSON: {path}\n")
        failed += sum("error" in t for t in trials)
    if failed:
        print(f"{failed} trial(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
