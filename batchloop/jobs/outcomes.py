"""What an attempt's end becomes in the jobs table: the result as JSON, the error as text,
the delay before a retry, and which server refusals no retry can cure. Pure functions."""

from __future__ import annotations

import json

import pydantic_core

from ..drivers.errors import connection_lost, sqlstate
from ..runtime.loop import storable as storable_text

RETRY_BASE = 0.5
"""Backoff of a failed attempt: about RETRY_BASE * 2**(attempt-1) seconds, jittered down to
half of that (the first retry comes within 0.5 s), at most RETRY_CAP."""
RETRY_CAP = 300.0
ERROR_MAX = 4000
"""Characters of an error message kept in the table."""


def backoff(attempt: int, jitter: float) -> float:
    """Seconds before retrying after failed attempt ``attempt`` (1-based); jitter in [0, 1)."""
    base = min(RETRY_CAP, RETRY_BASE * 2.0 ** min(attempt - 1, 30))
    return base * (0.5 + 0.5 * jitter)


def storable(text: str) -> str:
    """``text`` as PostgreSQL text accepts it (no NUL, no lone surrogate), bounded."""
    return storable_text(text)[:ERROR_MAX]


def describe(exc: BaseException) -> str:
    """``Type: message``, as a job's ``error`` keeps it (the traceback goes to the log)."""
    text = str(exc)
    return storable(f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def bad_value(exc: BaseException) -> bool:
    """The server refused a value (data exception, constraint, size limit): retrying the
    same statement cannot help. Anything else (a lost connection, a restart, a deadlock, a
    missing schema) is retried."""
    state = sqlstate(exc)
    return state is not None and not connection_lost(exc) and state[:2] in ("22", "23", "54")


def encode_result(result: object) -> str | None:
    """The handler's return value as JSON text: an object (a dict or a model) or None."""
    if result is None:
        return None
    text = pydantic_core.to_json(result).decode()
    if not text.startswith("{"):
        raise TypeError(
            f"a handler returns a dict (or a pydantic model) or None, got {type(result).__name__}"
        )
    if "\\u0000" in text:
        raise ValueError("the result holds a NUL character, which PostgreSQL's jsonb refuses")
    if ("Infinity" in text or "NaN" in text) and not _strict_json(text):
        raise ValueError("the result holds Infinity or NaN, which JSON cannot store")
    return text


def _strict_json(text: str) -> bool:
    def refuse(constant: str) -> None:
        raise ValueError(constant)

    try:
        json.loads(text, parse_constant=refuse)
    except ValueError:
        return False
    return True
