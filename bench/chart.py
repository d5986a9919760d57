"""Chart a drain benchmark result: throughput against batch size, one line per system.

    python bench/chart.py bench/results/drain-20261124-010000.json   # -> docs/benchmarks-drain.png
    python bench/chart.py RESULT.json --out /tmp/drain.png

Reads the JSON that ``bench/drain.py`` writes; plots each system's median rows/s (log-log),
with bars from the min to the max run, using matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "benchmarks-drain.png"

STYLE = {
    "raw": ("#222222", "o", "-"),
    "raw-cursor": ("#222222", "o", ":"),
    "batchloop": ("#1f77b4", "s", "-"),
    "batchloop-cursor": ("#1f77b4", "s", ":"),
    "raw-psycopg": ("#7f7f7f", "o", "--"),
    "batchloop-psycopg": ("#9467bd", "s", "--"),
    "pgqueuer": ("#2ca02c", "^", "-"),
    "procrastinate": ("#d62728", "D", "-"),
}


def _thousands(value: float, _pos: int) -> str:
    if value >= 1000:
        return f"{value / 1000:,.0f}k"
    return f"{value:,.0f}"


def chart(result: dict[str, Any], out: Path) -> Path:
    meta = result["meta"]
    summary = [e for e in result["summary"] if "median" in e]
    systems = [s for s in meta["systems"] if any(e["system"] == s for e in summary)]
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=120)
    for system in systems:
        points = sorted((e for e in summary if e["system"] == system), key=lambda e: e["batch"])
        xs = [e["batch"] for e in points]
        ys = [e["median"] for e in points]
        low = [e["median"] - e["min"] for e in points]
        high = [e["max"] - e["median"] for e in points]
        color, marker, line = STYLE.get(system, (None, "o", "-"))
        ax.errorbar(
            xs,
            ys,
            yerr=[low, high],
            label=system,
            color=color,
            marker=marker,
            linestyle=line,
            capsize=3,
            linewidth=1.8,
            markersize=6,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    batches = sorted({e["batch"] for e in summary})
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.minorticks_off()
    ax.yaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_xlabel("batch size (rows per transaction / jobs per dequeue)")
    ax.set_ylabel("rows (jobs) drained per second, median")
    machine = meta.get("machine", {})
    pg = machine.get("postgres", {}).get("server_version", "?")
    rows = meta.get("rows")
    ax.set_title(
        f"Drain throughput, {rows:,} pre-inserted rows"
        f" ({machine.get('cpus', '?')} CPUs, PostgreSQL {pg.split()[0]}, {meta.get('loop')})",
        fontsize=11,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    notes = [f"median of {meta.get('runs')} runs; bars: min to max"]
    if meta.get("batch1_rows"):
        notes.append(f"batch 1: {meta['batch1_rows']:,} rows")
    for system, cap in (meta.get("caps") or {}).items():
        if system in systems:
            notes.append(f"{system}: at most {cap:,} rows")
    if "procrastinate" in systems:
        notes.append("procrastinate has no batch fetch: x is its concurrency, capped (see JSON)")
    lines = ["; ".join(notes[:3]), "; ".join(notes[3:])] if len(notes) > 3 else ["; ".join(notes)]
    fig.text(0.01, 0.01, "\n".join(lines), ha="left", va="bottom", fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.02 + 0.025 * len(lines), 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("result", type=Path, help="JSON written by bench/drain.py")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    print(chart(json.loads(args.result.read_text()), args.out))


if __name__ == "__main__":
    main()
