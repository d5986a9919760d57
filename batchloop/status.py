"""Turning a status row into the public model (for :mod:`batchloop.calls`), and parsing the
stored config (also the loop's)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from .drivers.base import Row
from .models import Config, Owner, WorkerStatus

_SAME_NAMED = (
    *("name", "generation", "work_query", "worker", "last_work_at", "next_run_at", "batches"),
    *("consecutive_failures", "last_error", "last_error_at", "created_at", "owner_alive", "stale"),
)
"""The status query's columns that are WorkerStatus fields of the same name."""


def to_status(row: Row) -> WorkerStatus:
    owner = None
    if row["host_id"] is not None:
        owner = Owner(host_id=row["host_id"], hostname=row["hostname"], pid=row["pid"])
    # One hand-edited (or otherwise broken) config must not hide every other name: the row is
    # listed with the default Config and the reason, for the operator to repair.
    config_error = None
    try:
        config = parse_config(row["config"])
    except ValueError as exc:  # pydantic's ValidationError included
        config, config_error = Config(), config_problem(exc)
    return WorkerStatus(
        **{column: row[column] for column in _SAME_NAMED},
        state=row["status"],
        owner=owner,
        config=config,
        config_error=config_error,
    )


def parse_config(value: Any) -> Config:
    """Stored config; keys a newer version added are dropped rather than refused.

    Raises ValueError (pydantic's ValidationError for a wrong value) when it is not a valid
    config: not JSON, not a JSON object, or a value out of range.
    """
    data = json.loads(value) if isinstance(value, str | bytes) else value
    if not isinstance(data, Mapping):
        raise ValueError(f"the stored config is not a JSON object: {_clip(value)}")
    return Config(**{k: v for k, v in data.items() if k in Config.model_fields})


def config_problem(exc: ValueError) -> str:
    """One line saying what is wrong with a stored config."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']} (got {_clip(e.get('input'))})"
            for e in exc.errors(include_url=False)
        )
    return " ".join(str(exc).split())


def _clip(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
