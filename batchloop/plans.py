"""Plans: what a call or the migration does, as steps, apart from the I/O that runs them.

A plan is a generator (sans-IO): it yields a :class:`Query` (a named query of
``batchloop/sql/queries.sql``, whose rows it is sent back) or a :class:`Script` (SQL text without
parameters, sent back None) and returns the result. :func:`run` is the one driver: the async API
awaits it on a driver's session; ``batchloop.sync`` and the CLI run the same coroutine over a
blocking session (:func:`run_sync`), where every await has finished when it returns. So both
share every decision, and only the I/O differs.
"""

from __future__ import annotations

from collections.abc import Coroutine, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .drivers.base import Row

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Script:
    """SQL text that may hold several statements and no parameters; the reply is None."""

    sql: str


@dataclass(frozen=True, slots=True)
class Query:
    """A named query (batchloop/sql/queries.sql); the reply is its rows."""

    name: str
    args: tuple[Any, ...] = ()


Step = Script | Query
Plan = Generator[Step, "Sequence[Row] | None", T]


class PlanSession(Protocol):
    """What running a plan needs of a connection: a driver's async Session, or a sync one
    behind :func:`run_sync`."""

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]: ...

    async def script(self, sql: str) -> None: ...


class SyncSession(Protocol):
    def fetch(self, name: str, *args: Any) -> Sequence[Row]: ...

    def script(self, sql: str) -> None: ...


async def run(s: PlanSession, plan: Plan[T]) -> T:
    """Run ``plan`` on ``s``, in whatever transaction the caller has open."""
    reply: Sequence[Row] | None = None
    try:
        while True:
            step = plan.send(reply)
            if isinstance(step, Script):
                await s.script(step.sql)
                reply = None
            else:
                reply = await s.fetch(step.name, *step.args)
    except StopIteration as done:
        result: T = done.value
        return result


def run_sync(s: SyncSession, plan: Plan[T]) -> T:
    """:func:`run` over a blocking session, without an event loop."""
    return run_blocking(run(_Blocking(s), plan))


class _Blocking:
    """A sync session as :func:`run` takes one: each await is a blocking call that has
    finished when it returns, so the coroutine never suspends."""

    __slots__ = ("_s",)

    def __init__(self, s: SyncSession) -> None:
        self._s = s

    async def fetch(self, name: str, *args: Any) -> Sequence[Row]:
        return self._s.fetch(name, *args)

    async def script(self, sql: str) -> None:
        self._s.script(sql)


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that never suspends (its awaits are blocking calls), without
    an event loop, so sync code can share an async implementation."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a blocking coroutine suspended")
