"""Wake latency: from a producer's COMMIT to the start of the worker in a host process.

    python bench/latency.py --samples 1000 --warmup 100 [--trace 300]

One host process serves the name ``wake``; the producer (this process) inserts one row and calls
``batchloop.ping`` in one transaction, commits, and waits for the worker. Variants:

* ``idle``: the loop is idle (it went idle after its last batch: ``Idle(cooldown=0)``), so the
  ping wakes it with a NOTIFY and the host claims the name and runs an iteration. Interleaved,
  sample by sample and in random order, with the two baselines measured in the same run by a
  plain asyncpg process (``hosts.py listener``): a NOTIFY crossing processes (commit to the
  listener's callback), and NOTIFY plus a first work query on another connection (commit to
  that query's completion: the least any LISTEN-based loop can do).
* ``cooling``: the loop is still cooling down (polling every ``--poll`` s, the library default
  0.2 s); the ping finds it running and cooling, NOTIFYs its owner (``c``), and the host runs
  the loop at once instead of at its next poll (before migration 6 the next poll picked the
  row up: latency uniform over ``poll_interval``).
* ``no_notify``: the host does not LISTEN (batchloop has no switch for it; ``hosts.py`` swaps
  in a control connection whose ``listen`` is a no-op), so the wake-up reaches it only through
  the monitor query, every ``monitor_interval`` (0.5 s).

The clock: ``time.monotonic()``, which on Linux is ``CLOCK_MONOTONIC``, one kernel clock shared
by all processes on the machine. The producer reads it right after COMMIT returns (and right
before sending it: the commit happened in between); the worker reads it as its first statement,
and the host also stamps when the wake-up notification arrived and when the work query started
(for a breakdown). No database round trip sits between an event and its timestamp, which the
database clock cannot offer without ``track_commit_timestamp``. So the script needs the server,
the producer and the hosts on one machine, and refuses a non-local server.

``--trace N`` then runs N more idle-loop wakes with a host that stamps every statement it
sends, and tabulates the statements between COMMIT and the worker's start (claim, BEGIN with the
fence, work query) with their start offsets and durations.

Prints markdown tables and writes ``bench/results/latency-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import hosts
from hosts import Fleet, Proc, bench_database, dist, fmt, host_args

import batchloop as bl

NAME = "wake"
CHANNEL = "bench_baseline"
VARIANTS = ("idle", "cooling", "no_notify")
GOAL_P50_MS, GOAL_P99_MS = 2.0, 10.0

_STATE = """
SELECT w.status, EXISTS (
    SELECT 1 FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted
       AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
       AND ((l.classid::bigint << 32) | l.objid::bigint) = w.lock_key
) AS held
  FROM batchloop.workers w WHERE w.name = $1
"""


def check_local(dsn: str) -> None:
    parts = urlsplit(dsn)
    host = parts.hostname or parse_qs(parts.query).get("host", [""])[0]
    if host and not host.startswith("/") and host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(
            f"latency.py compares CLOCK_MONOTONIC readings across processes: the server must "
            f"run on this machine, not {host}"
        )


async def wait_idle(obs: Any, timeout: float = 30.0) -> None:
    """Until the name is idle and no host holds it (its loop ended and released the lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = await obs.fetchrow(_STATE, NAME)
        if row is not None and row["status"] == "idle" and not row["held"]:
            return
        await asyncio.sleep(0.002)
    raise TimeoutError("the loop did not go idle")


async def next_batch(host: Proc, first: int, timeout: float) -> list[str]:
    """The host's ``batch`` line for the batch that starts with item ``first``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no batch with item {first} within {timeout} s")
        parts = (await asyncio.wait_for(host.lines.get(), left)).split()
        if parts[0] == "batch" and parts[1] == NAME and int(parts[2]) == first:
            return parts


async def commit_timed(tr: Any) -> tuple[float, float]:
    t_send = time.monotonic()
    await tr.commit()
    return t_send, time.monotonic()


async def wake_sample(prod: Any, host: Proc, timeout: float) -> dict[str, Any]:
    tr = prod.transaction()
    await tr.start()
    first = await prod.fetchval("INSERT INTO bench_items (name) VALUES ($1) RETURNING id", NAME)
    result = await bl.ping(prod, NAME, hosts.bench_query, hosts.bench_worker)
    t_send, t_ack = await commit_timed(tr)
    parts = await next_batch(host, first, timeout)
    q, w = float(parts[4]), float(parts[5])
    n = None if parts[6] == "None" else float(parts[6])
    return {
        "ping": result,
        "latency": w - t_ack,
        "from_send": w - t_send,
        "commit_rtt": t_ack - t_send,
        "query_start": q - t_ack,
        # The host's last notification time is this sample's only if it came after our COMMIT.
        "notify": None if n is None or n < t_send else n - t_ack,
    }


async def baseline_sample(prod: Any, listener: Proc, seq: int) -> dict[str, Any]:
    """The same transaction shape (INSERT, then one more statement, COMMIT) with a bare NOTIFY."""
    tr = prod.transaction()
    await tr.start()
    item = await prod.fetchval("INSERT INTO bench_items (name) VALUES ('baseline') RETURNING id")
    await prod.execute(f"SELECT pg_notify('{CHANNEL}', $1)", str(seq))
    t_send, t_ack = await commit_timed(tr)
    while True:
        parts = (await asyncio.wait_for(listener.lines.get(), 10)).split()
        if parts[0] == "base" and int(parts[1]) == seq:
            break
    await prod.execute("DELETE FROM bench_items WHERE id = $1", item)
    return {
        "notify": float(parts[2]) - t_ack,
        "notify_query": float(parts[3]) - t_ack,
        "notify_from_send": float(parts[2]) - t_send,
        "notify_query_from_send": float(parts[3]) - t_send,
        "commit_rtt": t_ack - t_send,
    }


async def run(
    admin_dsn: str,
    *,
    samples: int = 1000,
    warmup: int = 100,
    variants: tuple[str, ...] = VARIANTS,
    poll: float = 0.2,
    monitor_interval: float = 0.5,
    seed: int = 1,
    trace: int = 0,
    verbose: bool = False,
    say: Any = print,
) -> dict[str, Any]:
    check_local(admin_dsn)
    rng = random.Random(seed)
    summary: dict[str, Any] = {
        "scenario": "latency",
        "samples": samples,
        "warmup": warmup,
        "poll_interval": poll,
        "monitor_interval": monitor_interval,
        "clock": "CLOCK_MONOTONIC, shared by all processes (time.monotonic())",
        "provenance": hosts.provenance(),
        "variants": {},
    }
    async with bench_database(admin_dsn, "latency") as dsn:
        fleet = Fleet(dsn, verbose=verbose)
        prod = await asyncpg.connect(dsn)
        obs = await asyncpg.connect(dsn)
        try:
            for variant in variants:
                say(f"variant {variant}: {warmup} warm-up + {samples} samples")
                started = time.monotonic()
                if variant == "idle":
                    out = await _idle(fleet, prod, obs, samples, warmup, rng, baselines=True)
                elif variant == "no_notify":
                    out = await _idle(
                        fleet,
                        prod,
                        obs,
                        samples,
                        warmup,
                        rng,
                        baselines=False,
                        no_listen=True,
                        monitor_interval=monitor_interval,
                    )
                elif variant == "cooling":
                    out = await _cooling(fleet, prod, samples, warmup, rng, poll)
                else:
                    raise ValueError(f"unknown variant {variant!r}")
                out["seconds"] = round(time.monotonic() - started, 1)
                summary["variants"][variant] = out
            if trace:
                say(f"traced idle wakes: {trace} samples")
                summary["trace"] = await _traced(fleet, prod, obs, trace, rng)
        finally:
            await fleet.close()
            await prod.close()
            await obs.close()
    summary["goals"] = goals(summary)
    return summary


async def _idle(
    fleet: Fleet,
    prod: Any,
    obs: Any,
    samples: int,
    warmup: int,
    rng: random.Random,
    *,
    baselines: bool,
    no_listen: bool = False,
    monitor_interval: float = 0.5,
) -> dict[str, Any]:
    host = await fleet.spawn(
        "host",
        *host_args(cooldown=0.0, echo=True, no_listen=no_listen, monitor_interval=monitor_interval),
    )
    listener = await fleet.spawn("listener", f"--channel={CHANNEL}") if baselines else None
    timeout = 30.0
    try:
        first, _ = await hosts.ping_items(prod, NAME)  # creates or wakes the worker
        await next_batch(host, first, timeout)
        await wait_idle(obs)
        wake: list[dict[str, Any]] = []
        base: list[dict[str, Any]] = []
        for i in range(warmup + samples):
            order = ["wake", "base"] if listener is not None else ["wake"]
            rng.shuffle(order)
            for kind in order:
                # Let every process settle; without LISTEN, also a random phase against the
                # monitor's ticks (the loop went idle just after one).
                pause = monitor_interval if no_listen else 0.0
                await asyncio.sleep(rng.uniform(0.01, 0.02) + rng.uniform(0, pause))
                if kind == "base":
                    assert listener is not None
                    b = await baseline_sample(prod, listener, i)
                    if i >= warmup:
                        base.append(b)
                else:
                    s = await wake_sample(prod, host, timeout)
                    if i >= warmup:
                        wake.append(s)
                    await wait_idle(obs)
    finally:
        await fleet.stop(host)
        if listener is not None:
            await fleet.stop(listener)
    out = _wake_stats(wake)
    if base:
        out["baseline_notify"] = dist([b["notify"] for b in base])
        out["baseline_notify_query"] = dist([b["notify_query"] for b in base])
        out["baseline_notify_from_commit_sent"] = dist([b["notify_from_send"] for b in base])
        out["baseline_notify_query_from_commit_sent"] = dist(
            [b["notify_query_from_send"] for b in base]
        )
        out["baseline_commit_rtt"] = dist([b["commit_rtt"] for b in base])
    return out


async def _cooling(
    fleet: Fleet, prod: Any, samples: int, warmup: int, rng: random.Random, poll: float
) -> dict[str, Any]:
    # A cooldown longer than the run: the loop keeps polling every `poll` seconds throughout.
    host = await fleet.spawn("host", *host_args(cooldown=1e6, poll=poll, echo=True))
    timeout = 30.0 + poll
    try:
        first, _ = await hosts.ping_items(prod, NAME)  # wakes the loop; it then never idles
        await next_batch(host, first, timeout)
        wake = []
        for i in range(warmup + samples):
            await asyncio.sleep(rng.uniform(0, poll))  # a random phase against the polls
            s = await wake_sample(prod, host, timeout)
            if i >= warmup:
                wake.append(s)
    finally:
        await fleet.stop(host)
    return _wake_stats(wake)


async def _traced(
    fleet: Fleet, prod: Any, obs: Any, samples: int, rng: random.Random
) -> list[dict[str, Any]]:
    """Idle-loop wakes with a host that prints every statement it sends: which statements lie
    between COMMIT and the worker's start, when each starts and how long it takes."""
    host = await fleet.spawn("host", *host_args(cooldown=0.0, echo=True, trace=True))
    per: dict[str, list[tuple[float, float]]] = {}
    try:
        await _drain_lines(host)
        first, _ = await hosts.ping_items(prod, NAME)
        await next_batch(host, first, 30)
        await wait_idle(obs)
        for i in range(samples + 5):
            await asyncio.sleep(rng.uniform(0.01, 0.02))
            await _drain_lines(host)
            tr = prod.transaction()
            await tr.start()
            first = await prod.fetchval(
                "INSERT INTO bench_items (name) VALUES ($1) RETURNING id", NAME
            )
            await bl.ping(prod, NAME, hosts.bench_query, hosts.bench_worker)
            t_send, t_ack = await commit_timed(tr)
            traces = []
            while True:
                parts = (await asyncio.wait_for(host.lines.get(), 30)).split(maxsplit=4)
                if parts[0] == "trace":
                    traces.append(parts)
                elif parts[0] == "batch" and parts[1] == NAME and int(parts[2]) == first:
                    worker = float(parts[4].split()[1])
                    break
            await wait_idle(obs)
            if i < 5:
                continue
            for _, begun, elapsed, _backend, text in traces:
                start = float(begun)
                if start >= t_send and start + float(elapsed) <= worker:
                    per.setdefault(text, []).append((start - t_ack, float(elapsed)))
            per.setdefault("(worker starts)", []).append((worker - t_ack, 0.0))
    finally:
        await fleet.stop(host)
    rows = []
    for text, xs in per.items():
        starts = sorted(x[0] for x in xs)
        took = sorted(x[1] for x in xs)
        rows.append(
            {
                "statement": text,
                "n": len(xs),
                "start_ms_p50": round(starts[len(starts) // 2] * 1000, 3),
                "duration_ms_p50": round(took[len(took) // 2] * 1000, 3),
                "duration_ms_p99": round(hosts.percentile(took, 99) * 1000, 3),
            }
        )
    return sorted(rows, key=lambda r: r["start_ms_p50"])


async def _drain_lines(host: Proc) -> None:
    while not host.lines.empty():
        host.lines.get_nowait()


def _wake_stats(wake: list[dict[str, Any]]) -> dict[str, Any]:
    pings: dict[str, int] = {}
    for s in wake:
        pings[s["ping"]] = pings.get(s["ping"], 0) + 1
    notified = [s["notify"] for s in wake if s["notify"] is not None]
    return {
        "ping_results": pings,
        "latency": dist([s["latency"] for s in wake]),
        "from_commit_sent": dist([s["from_send"] for s in wake]),
        "commit_rtt": dist([s["commit_rtt"] for s in wake]),
        "to_notify_at_host": dist(notified),
        "to_query_start": dist([s["query_start"] for s in wake]),
    }


def goals(summary: dict[str, Any]) -> dict[str, Any]:
    idle = summary["variants"].get("idle")
    if not idle or not idle["latency"]["n"]:
        return {}
    lat = idle["latency"]
    return {
        "wake_p50_ms": {"goal": GOAL_P50_MS, "measured": lat["p50"], "met": lat["p50"] <= 2.0},
        "wake_p99_ms": {"goal": GOAL_P99_MS, "measured": lat["p99"], "met": lat["p99"] <= 10.0},
    }


def markdown(summary: dict[str, Any]) -> str:
    v = summary["variants"]
    idle = v.get("idle")
    ref = idle["baseline_notify_query"]["p50"] if idle and "baseline_notify_query" in idle else None
    lines = [
        "Milliseconds from COMMIT returned to the producer (the commit happened between sending "
        "COMMIT and its return; the last columns count from COMMIT sent):",
        "",
        "| measurement | n | p50 | p95 | p99 | max | p50 from sent | p99 from sent "
        "| p50 / NOTIFY+query |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(label: str, d: dict[str, Any], sent: dict[str, Any]) -> None:
        ratio = f"{d['p50'] / ref:.1f}" if ref and d["p50"] is not None else "-"
        cells = [fmt(d[k]) for k in ("n", "p50", "p95", "p99", "max")]
        cells += [fmt(sent["p50"]), fmt(sent["p99"]), ratio]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    if idle and "baseline_notify" in idle:
        row(
            "baseline: NOTIFY crosses processes",
            idle["baseline_notify"],
            idle["baseline_notify_from_commit_sent"],
        )
        row(
            "baseline: NOTIFY + first work query on another connection",
            idle["baseline_notify_query"],
            idle["baseline_notify_query_from_commit_sent"],
        )
    labels = {
        "idle": "batchloop: idle loop woken by ping",
        "cooling": f"batchloop: loop cooling down (poll {summary['poll_interval']} s)",
        "no_notify": f"batchloop: idle loop, host without LISTEN (monitor "
        f"{summary['monitor_interval']} s)",
    }
    for name in VARIANTS:
        if name in v:
            row(labels[name], v[name]["latency"], v[name]["from_commit_sent"])
    if idle:

        def step(label: str, d: dict[str, Any]) -> str:
            return f"| {label} | {fmt(d['p50'])} | {fmt(d['p99'])} |"

        lines += [
            "",
            "Idle-loop breakdown (ms from COMMIT returned; the host stamps each step):",
            "",
            "| step | p50 | p99 |",
            "| --- | ---: | ---: |",
            step("COMMIT round trip (precedes 0)", idle["commit_rtt"]),
            step("notification reaches the host", idle["to_notify_at_host"]),
            step("work query starts (after dispatch, claim, BEGIN, fence)", idle["to_query_start"]),
            step("worker starts (after the work query)", idle["latency"]),
        ]
    if summary.get("trace"):
        lines += [
            "",
            "Traced idle wakes (a host printing every statement; tracing adds its own delay): "
            "statements between COMMIT and the worker's start, in order:",
            "",
            "| statement | n | starts at ms (p50) | takes ms (p50) | takes ms (p99) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for r in summary["trace"]:
            text = r["statement"].replace("|", "\\|")
            lines.append(
                f"| `{text}` | {r['n']} | {r['start_ms_p50']} | {r['duration_ms_p50']} | "
                f"{r['duration_ms_p99']} |"
            )
    g = summary.get("goals") or {}
    if g:
        lines.append("")
        lines.append(
            "Goals (idle loop, from COMMIT returned): "
            + "; ".join(
                f"{k} <= {x['goal']}: {x['measured']} ({'met' if x['met'] else 'NOT met'})"
                for k, x in g.items()
            )
        )
    for name in VARIANTS:
        if name in v:
            lines.append(f"{name}: ping results {v[name]['ping_results']}, {v[name]['seconds']} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dsn", default=hosts.default_admin_dsn(), help="server (admin) URL")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--poll", type=float, default=0.2, help="poll_interval while cooling")
    parser.add_argument("--monitor-interval", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="N",
        help="then N idle wakes with every host statement timed (a breakdown; slower)",
    )
    parser.add_argument("--out", type=Path, default=None, help="results directory")
    parser.add_argument("--verbose", action="store_true", help="show the hosts' stderr")
    args = parser.parse_args(argv)
    summary = asyncio.run(
        run(
            args.dsn,
            samples=args.samples,
            warmup=args.warmup,
            variants=tuple(x for x in args.variants.split(",") if x),
            poll=args.poll,
            monitor_interval=args.monitor_interval,
            seed=args.seed,
            trace=args.trace,
            verbose=args.verbose,
        )
    )
    hosts.report("latency", summary, argv, args.out, markdown)


if __name__ == "__main__":
    main()
