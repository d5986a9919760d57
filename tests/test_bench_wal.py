"""The benchmarks' WAL meter when the flush position lags the insert position.

``WalMeter.start`` reads the insert position and ``sample`` reads up to the flush position; on
a busy server the WAL writer may not have flushed up to the start yet. pg_walinspect refuses a
backwards range ("WAL start LSN must be less than end LSN"), so the meter must not ask for one.
A scripted connection stands in for the server: the condition is a race on a real one.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import hosts  # noqa: E402
from hosts import WalMeter  # noqa: E402

pytestmark = pytest.mark.anyio


def _pos(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


class LaggingServer:
    """Answers WalMeter's queries like PostgreSQL with pg_walinspect, with scripted positions."""

    def __init__(self, insert: str, flush: list[str]) -> None:
        self.insert = insert
        self.flush = flush
        self.chunks: list[tuple[str, str]] = []

    async def fetchval(self, query: str, *args: Any) -> Any:
        if "to_regprocedure" in query:
            return True
        if "pg_database" in query:
            return 16384
        if "pg_current_wal_insert_lsn" in query:
            return self.insert
        if "pg_current_wal_flush_lsn" in query:
            return self.flush.pop(0) if len(self.flush) > 1 else self.flush[0]
        if "::pg_lsn - " in query:
            return _pos(args[1]) - _pos(args[0])
        raise AssertionError(query)

    async def fetchrow(self, query: str, start: str, end: str, *_: Any) -> dict[str, Any]:
        assert "bench_wal_chunk" in query
        if _pos(start) >= _pos(end):
            raise RuntimeError("WAL start LSN must be less than end LSN")
        self.chunks.append((start, end))
        return {
            "o_bytes": 100, "o_records": 2, "o_fpi_bytes": 0, "o_xids": [7],
            "o_last_end": end, "o_kinds": '{"Heap/INSERT t": [2, 100]}',
        }  # fmt: skip

    async def execute(self, query: str, *args: Any) -> None:
        pass


def test_lsn_int() -> None:
    assert hosts.lsn_int("0/0") == 0
    assert hosts.lsn_int("16/B374D848") == (0x16 << 32) + 0xB374D848
    assert hosts.lsn_int("1/0") > hosts.lsn_int("0/FFFFFFFF")


async def test_flush_behind_start_is_nothing_yet() -> None:
    server = LaggingServer(insert="0/3000", flush=["0/2000"])
    meter = await WalMeter(server).start()
    await meter.sample()
    assert server.chunks == [] and meter.result()["db_bytes"] == 0
    assert meter.result()["cluster_bytes"] == 0


async def test_final_sample_waits_for_the_flush_to_catch_up() -> None:
    server = LaggingServer(insert="0/3000", flush=["0/2000", "0/2800", "0/3400"])
    meter = await WalMeter(server).start()
    await meter.sample(final=True)
    assert server.chunks == [("0/3000", "0/3400")]
    assert meter.result()["db_bytes"] == 100 and meter.result()["cluster_bytes"] == 0x400


async def test_flush_exactly_at_start_reads_nothing() -> None:
    server = LaggingServer(insert="0/3000", flush=["0/3000"])
    meter = await WalMeter(server).start()
    await meter.sample(final=True)
    assert server.chunks == [] and meter.result()["db_bytes"] == 0
