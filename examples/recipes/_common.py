"""What every recipe's ``main`` needs: the DSN from the environment, or a usage line."""

from __future__ import annotations

import os
import sys


def dsn_from_env(module: str) -> str:
    """``BATCHLOOP_DSN``, else ``DATABASE_URL``; exits with a usage line when neither is set."""
    dsn = os.environ.get("BATCHLOOP_DSN") or os.environ.get("DATABASE_URL")
    if not dsn:
        sys.exit(
            f"usage: DATABASE_URL=postgresql://user@host/db python -m examples.recipes.{module}"
        )
    return dsn
