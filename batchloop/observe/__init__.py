"""What the runtime reports about itself, for metrics, traces and logs.

The runtime calls the ``emit_*`` functions below at a few points (an iteration finished, a
name was claimed or let go, a ping ran). Each is guarded at the call site by ``if
observers:``, so with nothing registered the cost is one truth test of a module-level list.
Observers are plain objects with any of the methods of :class:`Observer`; an observer that
raises is logged and otherwise ignored: watching the work must never break it.

    from batchloop import observe
    from batchloop.observe.metrics import Metrics

    metrics = Metrics()            # its own CollectorRegistry
    observe.register(metrics)      # or: unregister = observe.register(metrics); unregister()
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .logs import ContextFilter, LogContext, current, install

log = logging.getLogger("batchloop")

Outcome = Literal[
    "committed",  # a batch was processed and committed
    "failed",  # the iteration raised and was rolled back
    "idle",  # the query found nothing and the worker went idle
    "waiting",  # the query found nothing and the worker went waiting (Idle(timeout=...))
    "polled",  # the query found nothing within the cooldown (or a ping held going idle off)
    "superseded",  # another host owns the name now
    "unrunnable",  # the name's callables are not registered in this process
]
OwnershipKind = Literal["claim", "release", "takeover"]


@dataclass(frozen=True, slots=True)
class IterationEvent:
    """One iteration of one name's loop ended."""

    name: str
    generation: int
    host_id: str | None
    outcome: Outcome
    seconds: float
    """Wall time of the iteration's transaction, callables included."""
    items: int | None = None
    """``len(batch)`` of a committed batch, when the batch is sized."""


@dataclass(frozen=True, slots=True)
class PingEvent:
    name: str
    result: str
    seconds: float


@dataclass(frozen=True, slots=True)
class OwnershipEvent:
    """``claim``: this host now runs ``name``; ``release``: it stopped running it;
    ``takeover``: it ended ``other_host``, a frozen owner, so that its names can be claimed."""

    kind: OwnershipKind
    host_id: str | None
    name: str | None = None
    generation: int | None = None
    other_host: str | None = None


@dataclass(frozen=True, slots=True)
class WakeEvent:
    """A wake-up (NOTIFY) reached the host and the name's loop was claimed, ``seconds`` later."""

    name: str
    host_id: str | None
    seconds: float


class Observer:
    """Base class with every hook as a no-op; override the ones you need."""

    def iteration(self, event: IterationEvent) -> None:
        pass

    def ping(self, event: PingEvent) -> None:
        pass

    def ownership(self, event: OwnershipEvent) -> None:
        pass

    def wake(self, event: WakeEvent) -> None:
        pass


observers: list[Observer] = []
"""The registered observers. The runtime tests this list before building any event."""


def register(observer: Observer) -> Callable[[], None]:
    """Start reporting to ``observer`` (once, however often it is registered); returns a
    function that unregisters it."""
    if not any(o is observer for o in observers):
        observers.append(observer)
    return lambda: unregister(observer)


def unregister(observer: Observer) -> None:
    """Stop reporting to ``observer`` (a no-op if it is not registered)."""
    observers[:] = [o for o in observers if o is not observer]


def _deliver(method: str, event: object) -> None:
    for observer in tuple(observers):  # an observer may unregister itself
        try:
            getattr(observer, method)(event)
        except Exception:
            log.exception("batchloop observer %r failed on %s", observer, method)


def emit_iteration(event: IterationEvent) -> None:
    _deliver("iteration", event)


def emit_ping(event: PingEvent) -> None:
    _deliver("ping", event)


def emit_ownership(event: OwnershipEvent) -> None:
    _deliver("ownership", event)


def emit_wake(event: WakeEvent) -> None:
    _deliver("wake", event)


install()  # every batchloop log record carries the batchloop_* fields

__all__ = [
    "ContextFilter",
    "IterationEvent",
    "LogContext",
    "Observer",
    "OwnershipEvent",
    "PingEvent",
    "WakeEvent",
    "current",
    "emit_iteration",
    "emit_ownership",
    "emit_ping",
    "emit_wake",
    "observers",
    "register",
    "unregister",
]
