"""The job registry: :func:`job` turns a module-level ``async def`` into a typed :class:`Job`.

A job's type names it in the database; a host runs only the types its process registered here
(nothing is imported or looked up because a row names it). The handler's payload annotation is
the job's contract: :meth:`Job.dispatch` validates against it before any SQL, and the handler
receives the validated value.
"""

from __future__ import annotations

import inspect
import logging
import math
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pydantic import TypeAdapter

from ..schema_name import DEFAULT_SCHEMA

if TYPE_CHECKING:
    from .context import JobContext
    from .model import JobRun

P = TypeVar("P")
log = logging.getLogger("batchloop")

DEFAULT_CONCURRENCY = 10
DEFAULT_RETENTION = 7 * 24 * 3600.0
"""Finished jobs are kept this long (seconds), then deleted by their queue's loop."""
QUEUE_MAX = 195
"""A queue's loop is the batchloop name ``jobs:<queue>``, at most 200 characters."""

OnComplete = Callable[[Any, "JobRun"], Awaitable[None]]


class NonRetryable(Exception):
    """Raise it from a handler to fail the job at once, without retrying."""


@dataclass(slots=True)
class JobSpec:
    """What the registry knows of a job type."""

    type: str
    queue: str
    handler: Callable[..., Awaitable[Any]]
    max_attempts: int
    lease: float
    on_complete: OnComplete | None
    concurrency: int | None
    retention: float | None
    _adapter: TypeAdapter[Any] | None = None

    @property
    def adapter(self) -> TypeAdapter[Any]:
        """Validates payloads against the handler's annotation (resolved on first use when
        it names a class defined after the handler)."""
        if self._adapter is None:
            self._adapter = _payload_adapter(self.handler, self.type)
        return self._adapter


@dataclass(frozen=True, slots=True)
class QueueSettings:
    concurrency: int
    retention: float


_types: dict[str, JobSpec] = {}


def lookup(type_: str) -> JobSpec | None:
    """The registered job type ``type_``, if this process registered it."""
    return _types.get(type_)


def types_of(queue: str) -> list[str]:
    """The job types of ``queue`` this process runs."""
    return [spec.type for spec in _types.values() if spec.queue == queue]


def queue_settings(queue: str) -> QueueSettings:
    """The queue's concurrency and retention, as its job types declared them: the smallest
    concurrency and the longest retention any of them gave (none: the defaults)."""
    specs = [spec for spec in _types.values() if spec.queue == queue]
    limits = [s.concurrency for s in specs if s.concurrency is not None]
    keeps = [s.retention for s in specs if s.retention is not None]
    return QueueSettings(
        min(limits) if limits else DEFAULT_CONCURRENCY,
        max(keeps) if keeps else DEFAULT_RETENTION,
    )


def check_queue(queue: object) -> str:
    if not isinstance(queue, str) or not 1 <= len(queue) <= QUEUE_MAX:
        raise ValueError(f"a job queue is a name of 1 to {QUEUE_MAX} characters, got {queue!r}")
    return queue


class Job(Generic[P]):
    """A registered job type: call :meth:`dispatch` (in your transaction) to create a job.

    Calling the object itself runs the handler directly, e.g. in a unit test.
    """

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.__wrapped__ = spec.handler
        self.__doc__ = spec.handler.__doc__
        self.__name__ = getattr(spec.handler, "__name__", spec.type)

    @property
    def type(self) -> str:
        return self.spec.type

    @property
    def queue(self) -> str:
        return self.spec.queue

    def __repr__(self) -> str:
        return f"<batchloop.jobs.Job {self.spec.type!r} queue={self.spec.queue!r}>"

    async def __call__(self, ctx: JobContext, payload: P) -> Any:
        return await self.spec.handler(ctx, payload)

    async def dispatch(
        self,
        conn: Any,
        payload: P,
        *,
        key: str | None = None,
        delay: float = 0.0,
        run_at: datetime | None = None,
        schema: str = DEFAULT_SCHEMA,
    ) -> int:
        """Create a job in the caller's transaction (asyncpg or psycopg async connection); its id.

        The payload is validated first (``pydantic.ValidationError``, nothing created). A
        ``key`` already used by a job of this type returns that job's id and creates nothing,
        also while the first dispatch is uncommitted elsewhere (this one waits for it). The job
        runs ``delay`` seconds after the transaction's start, or at ``run_at`` (aware).
        """
        from .dispatch import dispatch

        return await dispatch(self.spec, conn, payload, key, delay, run_at, schema)

    async def dispatch_many(
        self,
        conn: Any,
        payloads: Sequence[P],
        *,
        delay: float = 0.0,
        run_at: datetime | None = None,
        schema: str = DEFAULT_SCHEMA,
    ) -> list[int]:
        """Validate every payload, then create all the jobs in one statement; their ids, in
        order."""
        from .dispatch import dispatch_many

        return await dispatch_many(self.spec, conn, payloads, delay, run_at, schema)


def _payload_adapter(func: Callable[..., Any], type_: str) -> TypeAdapter[Any]:
    params = list(inspect.signature(func).parameters.values())
    if len(params) != 2:
        raise TypeError(
            f"job {type_!r}: a handler takes (ctx, payload), {func.__qualname__} takes "
            f"{len(params)} parameters"
        )
    try:
        hints = typing.get_type_hints(func)
    except NameError as exc:
        raise TypeError(
            f"job {type_!r}: the payload annotation of {func.__qualname__} does not resolve "
            f"({exc}); define its type at module level"
        ) from exc
    return TypeAdapter(hints.get(params[1].name, Any))


def _check_signature(func: Callable[..., Any], type_: str) -> TypeAdapter[Any] | None:
    """The payload adapter, or None while the annotation names a class not defined yet."""
    try:
        return _payload_adapter(func, type_)
    except TypeError as exc:
        if isinstance(exc.__cause__, NameError):
            return None
        raise


def job(
    type: str,
    *,
    queue: str = "default",
    max_attempts: int = 5,
    concurrency: int | None = None,
    lease: float = 60.0,
    on_complete: OnComplete | None = None,
    retention: float | None = None,
) -> Callable[[Callable[[JobContext, P], Awaitable[Any]]], Job[P]]:
    """Register a module-level ``async def handler(ctx: JobContext, payload: T)`` as job type
    ``type`` of ``queue``.

    ``max_attempts``: runs before the job fails (a handler that raises is retried with
    exponential backoff and jitter, the first retry within 1 s; :class:`NonRetryable` fails at
    once). ``concurrency``: handlers of the queue running at a time across the cluster
    (default 10; all types of a queue share it). ``lease``: seconds an attempt owns its job
    before another host may run it again (extended while the handler runs). ``on_complete``:
    ``async def fn(conn, run: JobRun)``, called once when a job reaches a final state, in
    the transaction that records it. ``retention``: seconds finished jobs of the queue are
    kept (default 7 days).

    >>> import pydantic, batchloop.jobs as jobs
    >>> class Email(pydantic.BaseModel):
    ...     to: str
    >>> @jobs.job("doc.email", queue="doc-emails")
    ... async def send_email(ctx: jobs.JobContext, payload: Email) -> dict[str, bool]:
    ...     return {"sent": True}
    >>> send_email.type, send_email.queue
    ('doc.email', 'doc-emails')
    """
    if not isinstance(type, str) or not 1 <= len(type) <= 200:
        raise ValueError(f"a job type is a name of 1 to 200 characters, got {type!r}")
    check_queue(queue)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"job {type!r}: max_attempts must be an int >= 1, got {max_attempts!r}")
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ValueError(f"job {type!r}: concurrency must be an int >= 1, got {concurrency!r}")
    if not isinstance(lease, int | float) or not math.isfinite(lease) or lease <= 0:
        raise ValueError(f"job {type!r}: lease must be a positive number of seconds")
    if retention is not None and (
        not isinstance(retention, int | float) or not math.isfinite(retention) or retention < 0
    ):
        raise ValueError(f"job {type!r}: retention must be a number of seconds >= 0")
    if on_complete is not None and not inspect.iscoroutinefunction(on_complete):
        raise TypeError(f"job {type!r}: on_complete must be an `async def fn(conn, run)`")

    def register(func: Callable[[JobContext, P], Awaitable[Any]]) -> Job[P]:
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"@jobs.job({type!r}) needs an `async def`, got {func!r}")
        qualname = getattr(func, "__qualname__", "")
        if "<" in qualname or "." in qualname:
            raise TypeError(
                f"@jobs.job({type!r}) needs a module-level function, got {qualname}: every "
                "host must define the same handler by importing its module"
            )
        spec = JobSpec(
            type,
            queue,
            func,
            max_attempts,
            float(lease),
            on_complete,
            concurrency,
            None if retention is None else float(retention),
            _check_signature(func, type),
        )
        existing = _types.get(type)
        if existing is not None and _ref(existing.handler) != _ref(func):
            raise TypeError(f"job type {type!r} is already registered by {_ref(existing.handler)}")
        for other in _types.values():
            if other.queue != queue or other.type == type:
                continue
            for what, rule in (("concurrency", "the smallest"), ("retention", "the longest")):
                mine, theirs = getattr(spec, what), getattr(other, what)
                if mine is not None and theirs is not None and mine != theirs:
                    log.warning(
                        "job %r: queue %r has %s=%r (job %r), this job says %r; the types of "
                        "a queue share one %s: %s applies",
                        type,
                        queue,
                        what,
                        theirs,
                        other.type,
                        mine,
                        what,
                        rule,
                    )
        _types[type] = spec
        from .queue import callables_for

        callables_for(queue)  # the queue's loop runs only where its callables are registered
        return Job(spec)

    return register


def _ref(func: Callable[..., Any]) -> str:
    return f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', '?')}"
