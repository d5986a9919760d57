"""What every recipe's ``main`` needs: the DSN from the environment, or a usage line."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any


def dsn_from_env(module: str) -> str:
    """``BATCHLOOP_DSN``, else ``DATABASE_URL``; exits with a usage line when neither is set."""
    dsn = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        sys.exit(
            f"usage: DATABASE_URL=postgresql://user@host/db python -m examples.recipes.{module}"
        )
    return dsn


async def until(conn: Any, query: str, *args: Any, timeout: float = 30.0) -> Any:
    """Poll ``query``'s single value until it is truthy (the demos' way to wait); returns it."""
    deadline = time.monotonic() + timeout
    while True:
        value = await conn.fetchval(query, *args)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout:g} s: {query}")
        await asyncio.sleep(0.05)
