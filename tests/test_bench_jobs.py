"""Smoke run of every jobs-benchmark scenario (``bench/jobs.py``), so the harness cannot rot.

Tiny: a couple of hundred jobs, a few latency samples, one round. It asserts that every trial
ran and completed every job, never how fast. pgqueuer and procrastinate come with the ``bench``
extra; without them the throughput scenario runs batchloop alone.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
PEERS = [p for p in ("pgqueuer", "procrastinate") if importlib.util.find_spec(p) is not None]

pytestmark = pytest.mark.slow


def test_every_scenario_runs_tiny(pg_admin_dsn: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "jobs.py"),
            "all",
            *("--dsn", pg_admin_dsn, "--jobs", "200", "--dispatch-jobs", "40"),
            *("--samples", "3", "--gap", "0.2", "--busy-rate", "100", "--runs", "1"),
            *("--concurrency", "2,4", "--systems", ",".join(["batchloop", *PEERS])),
            *("--json", str(tmp_path), "--quiet"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {}
    for path in tmp_path.glob("jobs-*.json"):
        saved = json.loads(path.read_text())
        results[saved["meta"]["scenario"]] = saved
    assert set(results) == {"throughput", "dispatch", "latency"}

    throughput = results["throughput"]["trials"]
    assert sorted((t["system"], t["concurrency"]) for t in throughput) == sorted(
        (s, c) for s in ("batchloop", *PEERS) for c in (2, 4)
    )
    for t in throughput:
        assert "error" not in t, t
        assert t["jobs_per_s"] > 0 and t["remaining"] == 0
    ratios = {
        (e["system"], e["concurrency"]): e.get("ratio") for e in results["throughput"]["summary"]
    }
    if "pgqueuer" in PEERS:
        assert ratios["pgqueuer", 4] == pytest.approx(1.0) and ratios["batchloop", 4] is not None

    dispatch = results["dispatch"]["trials"]
    assert {(t["system"], t["connections"]) for t in dispatch} == {
        (s, c) for s in ("insert", "dispatch") for c in (1, 8)
    }
    for t in dispatch:
        assert "error" not in t, t
        assert t["made"] == 40

    latency = {t["system"]: t for t in results["latency"]["trials"]}
    assert set(latency) == {"idle", "busy"}
    for t in latency.values():
        assert "error" not in t, t
        assert len(t["latencies_ms"]) == 3 and all(x > 0 for x in t["latencies_ms"])
    assert latency["busy"]["busy_jobs"] > 0
    assert "| idle |" in proc.stdout and "| busy |" in proc.stdout
