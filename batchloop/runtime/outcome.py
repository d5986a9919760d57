"""What happens after an iteration's transaction ends: callbacks told whether it committed.

A worker that starts something outside the database (``batchloop.jobs`` runs its handlers after
the lease commits) must not start it before the commit: a rollback would leave a handler running
for a lease that never existed. :func:`on_outcome` registers a callback for the current
iteration; :func:`collect` is how the iteration (:mod:`batchloop.runtime.iteration`) or the
testing kit's ``drain`` gathers them and calls them once the transaction (or savepoint) is over.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar

log = logging.getLogger("batchloop")

Outcome = Callable[[bool], None]
"""Called with True once the transaction committed, False once it rolled back (or when the
COMMIT's outcome is unknown, the connection lost: treat it as maybe-committed)."""

_pending: ContextVar[list[Outcome] | None] = ContextVar("batchloop_outcome", default=None)


def on_outcome(callback: Outcome) -> None:
    """Call ``callback(committed)`` when the current iteration's transaction ends.

    Only inside a worker or work query run by batchloop (a host's loop, ``tick``, or
    ``batchloop.testing.drain``); anywhere else there is no transaction of ours to wait for."""
    pending = _pending.get()
    if pending is None:
        raise RuntimeError(
            "batchloop.runtime.outcome.on_outcome: only inside a work query or worker run by "
            "batchloop"
        )
    pending.append(callback)


@contextlib.contextmanager
def collect() -> Iterator[list[Outcome]]:
    """Gather the callbacks registered inside; the caller calls :func:`settle` on them."""
    pending: list[Outcome] = []
    token = _pending.set(pending)
    try:
        yield pending
    finally:
        _pending.reset(token)


def settle(pending: list[Outcome], committed: bool) -> None:
    """Call each callback once; one that raises is logged and does not stop the others."""
    callbacks, pending[:] = list(pending), []
    for callback in callbacks:
        try:
            callback(committed)
        except Exception:
            log.exception("batchloop: a commit-outcome callback raised")
