"""Test helpers: synchronise on observable conditions instead of sleeping."""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio

T = TypeVar("T")

_TRUTHY: Any = object()  # the default ``expect``: any truthy value


async def wait_for(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not a cancel scope
    interval: float = 0.02,
    *,
    expect: Any = _TRUTHY,
    message: str | None = None,
) -> T:
    """Poll ``predicate`` (sync, or returning an awaitable) until it is satisfied; return its value.

    Satisfied means: the value is truthy (no ``expect``); ``expect(value)`` is truthy (``expect``
    callable); or ``value == expect`` (any other ``expect``). It is checked once more at the
    deadline; after that an ``AssertionError`` names the predicate and the last value seen.
    Exceptions raised by the predicate propagate at once.
    """
    if timeout < 0 or interval <= 0:
        raise ValueError("timeout must be >= 0 and interval > 0")
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        polls += 1
        if _satisfied(value, expect):
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            wanted = (
                "a truthy value"
                if expect is _TRUTHY
                else f"{_describe(expect)} to hold"
                if callable(expect)
                else f"{expect!r}"
            )
            raise AssertionError(
                f"wait_for timed out after {timeout:g} s ({polls} polls) waiting for "
                f"{_describe(predicate)} to give {wanted}; last value: {value!r}"
                + (f" ({message})" if message else "")
            )
        await anyio.sleep(min(interval, remaining))


def _satisfied(value: Any, expect: Any) -> bool:
    if expect is _TRUTHY:
        return bool(value)
    if callable(expect):
        return bool(expect(value))
    return bool(value == expect)


def _describe(fn: Any) -> str:
    name = getattr(fn, "__qualname__", None) or repr(fn)
    code = getattr(fn, "__code__", None)
    if code is not None:
        return f"{name} ({code.co_filename.rsplit('/', 1)[-1]}:{code.co_firstlineno})"
    return str(name)


async def count(conn: Any, query: str, *args: Any) -> int:
    """``query``'s single value as an int (a ``SELECT count(*) ...``, usually)."""
    return int(await conn.fetchval(query, *args))
