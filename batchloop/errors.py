"""Exceptions batchloop raises to its callers."""

from __future__ import annotations


class BatchloopError(Exception):
    """Base class for batchloop's own errors."""


class NotRegisteredError(BatchloopError, TypeError, ValueError):
    """A callable given to ``ping`` was not registered with a batchloop decorator.

    Both a TypeError and a ValueError: it is a bad argument whichever way a caller checks.
    """


class SchemaMissingError(BatchloopError):
    """The batchloop schema has not been created in this database."""


class SchemaTooNewError(BatchloopError):
    """The database schema was migrated by a newer batchloop than this one."""


class SessionRequiredError(BatchloopError):
    """A connection that must be one database session of its own (a host's control connection,
    a tick's connection) goes through a pooler that shares server sessions between clients,
    such as PgBouncer with ``pool_mode=transaction``."""


class Superseded(BatchloopError):
    """This loop's generation is no longer current: another claim or a stop fenced it out."""


class TransactionAborted(BatchloopError, RuntimeError):
    """An iteration's transaction could not commit, or a callable ended it itself."""
