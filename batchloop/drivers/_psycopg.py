"""psycopg 3 is optional at import time.

Plain ``psycopg`` needs a system libpq, which slim container images and stock macOS lack; its
import then fails. ``import batchloop``, the demo and asyncpg hosts must not need it, so the rest
of the package asks this module instead of importing psycopg at the top: the error classes to
test against (empty when psycopg cannot load) and :func:`require` for the features that do need
it (``Host(driver="psycopg")``, :mod:`batchloop.sync`, the CLI's status commands), which raises
one error naming the install command.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import BatchloopError

INSTALL = "pip install 'batchloop[psycopg]'"
"""Brings ``psycopg[binary]`` (a wheel with its own libpq) and psycopg-pool."""


class PsycopgUnavailable(BatchloopError, ImportError):
    """A psycopg feature was used but psycopg 3 (or its libpq, or psycopg_pool) cannot load.

    An ImportError too, so ``except ImportError`` around an optional feature still catches it.
    """


def _load() -> tuple[ModuleType | None, ImportError | None]:
    try:
        import psycopg
    except ImportError as exc:
        return None, exc
    return psycopg, None


psycopg, _error = _load()
"""The psycopg module, or None when it cannot be imported (not installed, no libpq)."""


def _reason(exc: BaseException) -> str:
    # psycopg lists every implementation it tried; the last line says why the last one failed.
    lines = [line.strip(" -") for line in str(exc).splitlines() if line.strip(" -")]
    return lines[-1] if lines else type(exc).__name__


def unavailable(feature: str, exc: BaseException) -> PsycopgUnavailable:
    """The error for ``feature`` when psycopg (or psycopg_pool) failed to import with ``exc``."""
    return PsycopgUnavailable(
        f"{feature} needs psycopg 3, which cannot be loaded here ({_reason(exc)}); "
        f"install it with: {INSTALL}"
    )


def require(feature: str, *, pool: bool = False) -> None:
    """Raise :class:`PsycopgUnavailable` unless psycopg (and with ``pool``, psycopg_pool) loads."""
    if psycopg is None:
        assert _error is not None
        raise unavailable(feature, _error)
    if pool:
        try:
            import psycopg_pool  # noqa: F401
        except ImportError as exc:
            raise unavailable(feature, exc) from exc


if psycopg is not None:
    ERRORS: tuple[type[BaseException], ...] = (psycopg.Error,)
    OPERATIONAL: tuple[type[BaseException], ...] = (psycopg.OperationalError,)
    CONNECTION_LOST: tuple[type[BaseException], ...] = (
        psycopg.errors.ConnectionException,
        psycopg.errors.OperatorIntervention,  # 57xxx: terminated backend, shutdown, restart
    )
else:
    ERRORS = ()
    OPERATIONAL = ()
    CONNECTION_LOST = ()


def socket_gone(exc: BaseException) -> bool:
    """psycopg raises a bare OperationalError (no SQLSTATE) when the socket goes."""
    return bool(
        psycopg is not None and isinstance(exc, psycopg.OperationalError) and exc.sqlstate is None
    )


def is_connection(obj: object) -> bool:
    """A psycopg Connection or AsyncConnection (never, when psycopg cannot load)."""
    return bool(
        psycopg is not None and isinstance(obj, psycopg.Connection | psycopg.AsyncConnection)
    )


__all__ = [
    "CONNECTION_LOST",
    "ERRORS",
    "INSTALL",
    "is_connection",
    "PsycopgUnavailable",
    "require",
    "socket_gone",
    "unavailable",
]
