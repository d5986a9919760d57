"""The chaos soak's short variant: a few faults of every kind, then the invariants."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import soak

pytestmark = pytest.mark.anyio


async def test_short_soak_recovers_from_every_fault_and_keeps_invariants() -> None:
    """On a throwaway cluster, so restarts and half-open connections are in the mix."""
    summary = await soak.run(None, faults=12, names=6, lag=2.0, say=lambda *_: None)
    assert summary["violations"] == {"lost": 0, "duplicated": 0, "overlapping": 0, "backwards": 0}
    assert summary["left_unprocessed"] == 0 and summary["items"] > 0
    assert set(summary["kinds"]) == set(soak.CLUSTER_KINDS)
    for kind, stats in summary["kinds"].items():
        assert stats["count"] == 2 and stats["missed"] == 0, (kind, stats)
    assert summary["kinds"]["sigkill"]["max"] < 1.0
    assert summary["kinds"]["sigstop"]["max"] < 2.0 + 3.0
