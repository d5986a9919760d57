"""Tiny runs of the benchmark scripts (latency, ping cost, failover, idle cost, many names,
cold round trips).

Each runs its command line with toy sizes into a temporary results directory and checks that
the output is complete and sane: counts add up, every sample arrived, goals are evaluated. No
timing is asserted (CI machines are noisy); the full-size runs are in bench/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import cold_trips  # noqa: E402
import failover  # noqa: E402
import idle_cost  # noqa: E402
import latency  # noqa: E402
import many_names  # noqa: E402
import ping_cost  # noqa: E402

pytestmark = pytest.mark.slow


def _result(out: Path, kind: str) -> dict[str, Any]:
    files = sorted(out.glob(f"{kind}-*.json"))
    assert len(files) == 1, files
    data: dict[str, Any] = json.loads(files[0].read_text())
    assert data["command"].startswith(f"python bench/{kind}.py")
    assert data["provenance"]["batchloop"]
    return data


def _positive(d: dict[str, Any], n: int) -> None:
    assert d["n"] == n
    assert d["p50"] is not None and d["p50"] <= d["p95"] <= d["p99"] <= d["max"]


def test_latency_smoke(pg_admin_dsn: str, tmp_path: Path, capsys: Any) -> None:
    host = urlsplit(pg_admin_dsn).hostname
    if host not in (None, "", "127.0.0.1", "localhost", "::1"):
        pytest.skip("latency.py needs the server on this machine")
    latency.main(
        ["--dsn", pg_admin_dsn, "--samples", "4", "--warmup", "1", "--poll", "0.05",
         "--monitor-interval", "0.2", "--out", str(tmp_path)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "baseline: NOTIFY crosses processes" in printed and "Goals (idle loop" in printed
    data = _result(tmp_path, "latency")
    v = data["variants"]
    assert set(v) == set(latency.VARIANTS)
    assert v["idle"]["ping_results"] == {"woken": 4}
    assert v["no_notify"]["ping_results"] == {"woken": 4}
    assert v["cooling"]["ping_results"] == {"unchanged": 4}
    for name in latency.VARIANTS:
        _positive(v[name]["latency"], 4)
        # The worker starts after the work query, which starts after the commit was sent.
        assert v[name]["from_commit_sent"]["p50"] > 0
        assert v[name]["to_query_start"]["p50"] <= v[name]["latency"]["p50"]
    _positive(v["idle"]["baseline_notify"], 4)
    _positive(v["idle"]["baseline_notify_query"], 4)
    assert v["idle"]["to_notify_at_host"]["n"] == 4  # the listening host saw every wake-up
    assert v["no_notify"]["to_notify_at_host"]["n"] == 0  # and the deaf one none
    assert set(data["goals"]) == {"wake_p50_ms", "wake_p99_ms"}


def test_ping_cost_smoke(pg_admin_dsn: str, tmp_path: Path, capsys: Any) -> None:
    ping_cost.main(
        ["--dsn", pg_admin_dsn, "--seconds", "0.2", "--rounds", "2", "--connections", "1,2",
         "--wal-pings", "100", "--out", str(tmp_path)]
    )  # fmt: skip
    assert "ping / SELECT 1" in capsys.readouterr().out
    data = _result(tmp_path, "ping_cost")
    assert data["worker"]["state"] == "running" and data["worker"]["owner"] is None
    for n in ("1", "2"):
        t = data["throughput"][n]
        assert t["ping"]["per_s_median"] > 0 and t["select1"]["per_s_median"] > 0
    w = data["wal"]
    assert w["ping"]["db_stats"]["tup_inserted"] == 0
    assert w["ping"]["db_stats"]["tup_updated"] == 0
    assert data["in_transaction"] == {
        "ping": "unchanged",
        "xid_assigned": None,
        "locks": data["in_transaction"]["locks"],
    }
    assert not any(
        lock.startswith(("tuple", "transactionid")) for lock in data["in_transaction"]["locks"]
    )
    if w["exact"]:  # pg_walinspect available: the meter must see the control's writes
        # (no equality on the other windows: autovacuum may write in the database meanwhile)
        assert w["control_inserts"]["db_bytes"] > 0


def test_failover_smoke(pg_admin_dsn: str, tmp_path: Path, capsys: Any) -> None:
    failover.main(["--dsn", pg_admin_dsn, "--trials", "2", "--quiet", "--out", str(tmp_path)])
    assert "SIGKILL of the owner" in capsys.readouterr().out
    data = _result(tmp_path, "failover")
    assert data["missed"] == 0
    _positive(data["to_batch_db_clock"], 2)
    killed_then = {t["new_owner"] for t in data["trials_detail"]}
    assert len(killed_then) >= 1


def test_idle_cost_smoke(pg_admin_dsn: str, tmp_path: Path, capsys: Any) -> None:
    idle_cost.main(
        ["--dsn", pg_admin_dsn, "--seconds", "1", "--workers", "20", "--hosts", "2",
         "--settle", "1", "--quiet", "--out", str(tmp_path)]
    )  # fmt: skip
    assert "statements/s (hosts)" in capsys.readouterr().out
    data = _result(tmp_path, "idle_cost")
    phases = data["phases"]
    assert list(phases) == ["hosts, no workers", "hosts + idle workers", "idle workers, no hosts"]
    assert phases["hosts, no workers"]["statements_per_s"] > 0  # heartbeats and monitor ticks
    assert phases["idle workers, no hosts"]["statements_per_s"] == 0
    assert len(phases["hosts + idle workers"]["statements_per_s_per_host"]) == 2
    assert data["monitor_query_idle_workers"]["plan"]


def test_many_names_smoke(pg_admin_dsn: str, tmp_path: Path, capsys: Any) -> None:
    many_names.main(
        ["--dsn", pg_admin_dsn, "--names", "30", "--rows", "2", "--hosts", "2",
         "--producers", "2", "--cooldown", "0.2", "--quiet", "--out", str(tmp_path)]
    )  # fmt: skip
    assert "most names held at once" in capsys.readouterr().out
    data = _result(tmp_path, "many_names")
    assert data["items_processed"] == 60
    assert data["drain_s"] is not None and data["all_idle_s"] is not None
    assert sum(r["names"] for r in data["spread"]) == 30 + data["names_on_several_hosts"]
    _positive(data["ping_to_first_batch"], 30)


def test_cold_trips_smoke(pg_admin_dsn: str, tmp_path: Path, capsys: Any) -> None:
    cold_trips.main(
        ["--dsn", pg_admin_dsn, "--samples", "20", "--pause", "0.005", "--out", str(tmp_path)]
    )
    assert "after a pause" in capsys.readouterr().out
    data = _result(tmp_path, "cold_trips")
    ways = {(r["statement"], r["way"]): r for r in data["results"]}
    assert set(ways) == {
        (s, w) for s in cold_trips.STATEMENTS for w in ("back to back", "after a pause")
    }
    for (_, way), r in ways.items():
        _positive(r, 18 if way == "back to back" else 20)
