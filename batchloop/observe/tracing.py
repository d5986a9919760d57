"""OpenTelemetry spans for iterations and pings (extra ``otel``: opentelemetry-api only).

When a tracer provider is configured (the global one, ``opentelemetry.trace.
set_tracer_provider``, or one given to :func:`use`), each iteration of a loop is a span
``batchloop.iteration`` with attributes ``batchloop.name``, ``batchloop.generation`` and
``batchloop.outcome`` (committed, failed, idle, waiting, polled, superseded, unrunnable); spans
of an instrumented driver (asyncpg, psycopg) and of the user's code nest under it. With
``use(..., callables=True)`` the work query and the worker get child spans of their own,
``batchloop.work_query`` and ``batchloop.worker``. They are off by default because each SDK span
costs tens of microseconds, and a loop draining batches of 100 runs an iteration a millisecond:
three spans an iteration cost about 8% of the drain, one about 3% (docs/benchmarks.md).
``ping`` is a span ``batchloop.ping`` with ``batchloop.name`` and ``batchloop.ping.result``.

Without opentelemetry-api, or with no provider configured, every function here returns one
shared no-op context manager. Whether a global provider has been configured is looked up at
most once a second (the lookup reads the environment, a microsecond), so a provider set after
the host started is used within a second; the child spans only exist under an iteration span.
"""

from __future__ import annotations

import contextlib
import time
from contextlib import AbstractContextManager
from typing import Any

try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, StatusCode
except ImportError:  # pragma: no cover - exercised only without the extra
    _trace = None  # type: ignore[assignment]

_NULL: AbstractContextManager[Any] = contextlib.nullcontext(None)

_provider: Any = None
"""A provider given to :func:`use`, else None: the global one."""
_tracer: Any = None
"""The tracer, once a real provider was found (providers are set once, at startup)."""
_next_check = 0.0
"""``time.monotonic()`` before which the global provider is not looked up again."""
_callables = False
"""Whether the work query and the worker get child spans (:func:`use`)."""
CHECK_EVERY = 1.0


def use(provider: Any = None, *, callables: bool = False) -> None:
    """Send batchloop's spans to ``provider`` instead of the global tracer provider (None: back
    to the global one); ``callables=True`` adds the work query's and the worker's child spans.

    >>> from batchloop.observe import tracing
    >>> tracing.use(callables=True)  # the global provider, with the callables' spans
    >>> tracing.use()  # back to the defaults
    """
    global _provider, _tracer, _next_check, _callables
    _provider, _tracer, _next_check, _callables = provider, None, 0.0, callables


def tracer() -> Any:
    """The tracer, or None while no tracer provider is configured."""
    global _tracer, _next_check
    if _tracer is not None:
        return _tracer
    if _trace is None:
        return None
    provider = _provider
    if provider is None:
        now = time.monotonic()
        if now < _next_check:
            return None
        _next_check = now + CHECK_EVERY
        provider = _trace.get_tracer_provider()
    if isinstance(provider, ProxyTracerProvider | NoOpTracerProvider):
        return None
    from .._version import __version__

    _tracer = provider.get_tracer("batchloop", __version__)
    return _tracer


def iteration_span(name: str, generation: int) -> AbstractContextManager[Any]:
    """Around one iteration; yields the span (None when tracing is off) for :func:`outcome`.
    Exceptions are recorded by :func:`outcome` (the loop handles them inside the span)."""
    t = tracer()
    if t is None:
        return _NULL
    return t.start_as_current_span(  # type: ignore[no-any-return]
        "batchloop.iteration",
        attributes={"batchloop.name": name, "batchloop.generation": generation},
    )


def outcome(span: Any, outcome: str, exc: BaseException | None = None) -> None:
    """Set the iteration span's outcome; a failure's exception marks it as an error."""
    if span is None:
        return
    span.set_attribute("batchloop.outcome", outcome)
    if exc is not None:
        span.record_exception(exc)
        span.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")


def query_span() -> AbstractContextManager[Any]:
    """Around the work query's call (inside an iteration span, with ``use(callables=True)``)."""
    t = _tracer
    return _NULL if t is None or not _callables else t.start_as_current_span("batchloop.work_query")


def worker_span() -> AbstractContextManager[Any]:
    """Around the worker's call (inside an iteration span, with ``use(callables=True)``)."""
    t = _tracer
    return _NULL if t is None or not _callables else t.start_as_current_span("batchloop.worker")


def ping_span(name: str) -> AbstractContextManager[Any]:
    """Around a ping; set its result with :func:`ping_result`."""
    t = tracer()
    if t is None:
        return _NULL
    return t.start_as_current_span(  # type: ignore[no-any-return]
        "batchloop.ping", attributes={"batchloop.name": name}
    )


def ping_result(span: Any, result: str) -> None:
    if span is not None:
        span.set_attribute("batchloop.ping.result", result)


__all__ = [
    "iteration_span",
    "outcome",
    "ping_result",
    "ping_span",
    "query_span",
    "tracer",
    "use",
    "worker_span",
]
