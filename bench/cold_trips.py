"""Round trips to a backend that has been asleep: what an idle wake-up's statements cost.

    python bench/cold_trips.py --samples 200 --pause 0.02

An idle wake-up sends its claim and its first booking to backends that have had nothing to do
since the last wake-up (the control connection's, a pool connection's). This times, on one
connection of this process, a plain ``SELECT 1`` and a claim of a running name
(``claim_many``, then its session lock given back, untimed) two ways: back to back, and each
after ``--pause`` seconds of doing nothing (the client and the backend both sleep). The claim
runs with ``synchronous_commit`` off, as the control session runs it. Samples come in blocks of
ten of one kind, the kinds alternating block by block, so drift hits all alike; a back-to-back
block's first sample is not counted (it follows a pause).

Prints a markdown table and writes ``bench/results/cold_trips-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import asyncpg
import hosts
from hosts import bench_database, dist, fmt

import batchloop as bl

NAME = "cold"
BLOCK = 10
STATEMENTS = {
    "SELECT 1": "SELECT 1",
    "claim_many (one name)": "SELECT * FROM batchloop.claim_many(ARRAY['cold'], 'bench', '{}')",
}


async def run(admin_dsn: str, *, samples: int = 200, pause: float = 0.02) -> dict[str, Any]:
    times: dict[tuple[str, str], list[float]] = {
        (label, way): [] for label in STATEMENTS for way in ("back to back", "after a pause")
    }
    async with bench_database(admin_dsn, "cold") as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            async with conn.transaction():
                await bl.ping(conn, NAME, hosts.bench_query, hosts.bench_worker)
            await conn.execute("SET synchronous_commit TO off")
            # Blocks of BLOCK samples: within a block, statements back to back (the machine as
            # busy as a draining loop keeps it) or each after a pause; blocks alternate.
            for _block in range(0, samples, BLOCK):
                for label, text in STATEMENTS.items():
                    for way in ("back to back", "after a pause"):
                        for j in range(BLOCK):
                            if way == "after a pause":
                                await asyncio.sleep(pause)
                            started = time.perf_counter()
                            rows = await conn.fetch(text)
                            took = time.perf_counter() - started
                            if label.startswith("claim"):
                                if not rows:
                                    raise RuntimeError("the claim found nothing to claim")
                                await conn.execute("SELECT pg_advisory_unlock_all()")
                            if j > 0 or way == "after a pause":  # a block's first is neither
                                times[(label, way)].append(took)
        finally:
            await conn.close()
    return {
        "scenario": "cold_trips",
        "samples": samples,
        "pause_s": pause,
        "results": [
            {"statement": label, "way": way, **dist(values)}
            for (label, way), values in times.items()
        ],
        "provenance": hosts.provenance(),
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"Milliseconds per round trip, on one connection (pause {summary['pause_s']} s):",
        "",
        "| statement | sent | n | p50 | p95 | max |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in summary["results"]:
        lines.append(
            f"| {r['statement']} | {r['way']} | {r['n']} | {fmt(r['p50'])} | {fmt(r['p95'])} "
            f"| {fmt(r['max'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=hosts.default_admin_dsn(), help="server (admin) URL")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--pause", type=float, default=0.02, help="seconds asleep before each")
    hosts.output_options(parser)
    args = parser.parse_args(argv)
    summary = asyncio.run(run(args.dsn, samples=args.samples, pause=args.pause))
    hosts.report("cold_trips", summary, argv, args.out, markdown)


if __name__ == "__main__":
    main()
