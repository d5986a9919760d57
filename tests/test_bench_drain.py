"""Smoke run of every drain-benchmark variant (``bench/drain.py``), so the harness cannot rot.

Tiny: a few hundred rows, batch sizes 1 and 100, one round. It asserts that every trial ran and
drained every row (and, for raw and batchloop, in the expected number of batches), never how
fast. pgqueuer and procrastinate come with the ``bench`` extra (``pip install -e '.[bench]'``);
without them their variants are skipped, as is the chart without matplotlib.
"""

from __future__ import annotations

import importlib.util
import json
import math
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
SYSTEMS: tuple[str, ...] = runpy.run_path(str(BENCH / "drain.py"))["SYSTEMS"]
PEERS = ("pgqueuer", "procrastinate")
ROWS, BATCH1_ROWS, BATCHES = 250, 20, (1, 100)

pytestmark = pytest.mark.slow


def _installed(system: str) -> bool:
    return system not in PEERS or importlib.util.find_spec(system) is not None


@pytest.fixture(scope="module")
def smoke(pg_admin_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny run of every installed system; the JSON it wrote."""
    out = tmp_path_factory.mktemp("drain") / "drain.json"
    systems = [s for s in SYSTEMS if _installed(s)]
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "drain.py"),
            "--dsn",
            pg_admin_dsn,
            "--rows",
            str(ROWS),
            "--batch1-rows",
            str(BATCH1_ROWS),
            "--batches",
            ",".join(map(str, BATCHES)),
            "--runs",
            "1",
            "--systems",
            ",".join(systems),
            "--json",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), proc.stderr[-3000:] + proc.stdout[-3000:]
    result: dict[str, Any] = json.loads(out.read_text())
    result["returncode"] = proc.returncode
    result["stdout"] = proc.stdout
    return result


@pytest.mark.parametrize("system", SYSTEMS)
def test_every_variant_drains_every_row(smoke: dict[str, Any], system: str) -> None:
    if not _installed(system):
        pytest.skip(f"{system} is not installed (pip install -e '.[bench]')")
    trials = [t for t in smoke["trials"] if t["system"] == system]
    assert sorted(t["batch"] for t in trials) == list(BATCHES)
    for t in trials:
        assert "error" not in t, t["error"]
        rows = BATCH1_ROWS if t["batch"] == 1 else ROWS
        assert t["rows"] == rows
        assert t["remaining"] == 0, t
        assert t["drain_s"] > 0 and t["rows_per_s"] > 0
        if system not in PEERS:
            assert t["batches"] == math.ceil(rows / t["batch"]), t
        else:
            assert t["enqueue_s"] > 0 and t["settings"], t


def test_report_has_a_table_per_batch_and_ratios_to_raw(smoke: dict[str, Any]) -> None:
    assert smoke["returncode"] == 0, smoke["stdout"]
    for batch in BATCHES:
        assert f"#### Batch size {batch}" in smoke["stdout"]
    for entry in smoke["summary"]:
        assert entry["runs"] == 1 and entry["errors"] == 0, entry
        assert entry["min"] <= entry["median"] <= entry["max"]
        assert entry["ratio"] > 0
    assert smoke["meta"]["machine"]["postgres"]["server_version"]


def test_chart_writes_a_png(smoke: dict[str, Any], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(BENCH))
    try:
        import chart
    finally:
        sys.path.remove(str(BENCH))
    out = chart.chart(smoke, tmp_path / "drain.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
