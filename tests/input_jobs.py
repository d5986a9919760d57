"""Registered callables for the input-hardening tests (tests/test_inputs.py).

They touch no table, so they run on asyncpg and psycopg connections alike. What each name's
loop does is set in ``MODES`` (read only by this process): ``"fail"`` raises ``ERRORS[name]``
from the worker; ``"debounce_far"`` / ``"idle_far"`` ask for the longest delay allowed;
anything else processes one batch and then goes idle.
"""

from __future__ import annotations

from typing import Any

import batchloop as bl
from batchloop.models import MAX_SECONDS

MODES: dict[str, str] = {}
ERRORS: dict[str, str] = {}
_DONE: set[str] = set()


@bl.work_query
async def query(conn: Any, name: str) -> bl.Work[list[str]] | bl.Idle:
    mode = MODES.get(name, "")
    if mode == "idle_far":
        return bl.Idle(timeout=MAX_SECONDS, cooldown=0.0)
    if mode == "fail" or name not in _DONE:
        return bl.Work([name])
    return bl.Idle(cooldown=0.0)


@bl.worker
async def worker(conn: Any, batch: list[str]) -> bl.Debounce | None:
    name = batch[0]
    mode = MODES.get(name, "")
    if mode == "fail":
        raise RuntimeError(ERRORS[name])
    _DONE.add(name)
    if mode == "debounce_far":
        return bl.Debounce(MAX_SECONDS)
    return None
