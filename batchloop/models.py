"""The values users hand to batchloop and get back from it."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

State = Literal["idle", "waiting", "running", "stopped"]

MAX_SECONDS = 1e9
"""The longest delay a work query or worker may ask for (about 31 years). PostgreSQL intervals
end not far beyond (about 292,000 years in microseconds); a bound here turns a mistake into a
clear error at once rather than an ``interval out of range`` on every iteration."""


def _check_seconds(what: str, value: object, expected: str) -> None:
    """``value`` is a finite number of seconds in [0, MAX_SECONDS]; refused here, where the
    user's code made it, rather than later in the loop as an SQL error on every iteration."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be {expected}, got {type(value).__name__} {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):  # also keeps inf and nan out of SQL
        raise ValueError(f"{what} must be a finite number of seconds, got {value!r}")
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"{what} must be {expected} and at most {MAX_SECONDS:.0e}, got {value!r}")


@dataclass(frozen=True, slots=True)
class Work(Generic[T]):
    """Returned by a work query: process ``batch`` now."""

    batch: T


@dataclass(frozen=True, slots=True)
class Idle:
    """Returned by a work query: nothing to do now.

    While within ``cooldown`` seconds of the last work (or wake), the loop polls again
    every ``poll_interval`` seconds. After that it goes idle until a ping, or, with
    ``timeout``, wakes by itself after at most ``timeout`` seconds.
    """

    timeout: float | None = None
    cooldown: float = 2.0
    poll_interval: float = 0.2

    def __post_init__(self) -> None:
        if self.timeout is not None:
            _check_seconds("Idle.timeout", self.timeout, "None or a number of seconds >= 0")
        _check_seconds("Idle.cooldown", self.cooldown, "a number of seconds >= 0")
        _check_seconds("Idle.poll_interval", self.poll_interval, "a number of seconds > 0")
        if not self.poll_interval > 0:
            raise ValueError(f"Idle.poll_interval must be > 0, got {self.poll_interval!r}")


@dataclass(frozen=True, slots=True)
class Debounce:
    """Returned by a worker: do not run again, and ignore pings, for ``seconds``."""

    seconds: float

    def __post_init__(self) -> None:
        _check_seconds("Debounce.seconds", self.seconds, "a number of seconds >= 0")


class Config(BaseModel):
    """Per-name settings, stored with the worker and replaced whole when a ping passes one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    debounce: float = Field(default=0.0, ge=0.0, le=86_400.0, allow_inf_nan=False)
    """Delay before the first batch after a wake, so a burst accumulates."""
    monitor_lag: float = Field(default=60.0, ge=1.0, le=86_400.0, allow_inf_nan=False)
    """How long a frozen or unreachable owner may go unnoticed; also the retry backoff cap."""
    iteration_timeout: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """Cancel a work query plus worker that runs longer than this; counts as a failure."""
    max_failures: int | None = Field(default=None, ge=1, le=2_147_483_647)
    """Stop the worker after this many consecutive failures (None: retry for ever), keeping
    ``last_error``: a poison batch ends in a visible state; :func:`batchloop.start` resumes it."""


class Owner(BaseModel):
    """The live process whose loop holds a name."""

    model_config = ConfigDict(frozen=True)

    host_id: str
    hostname: str
    pid: int


class WorkerStatus(BaseModel):
    """A snapshot of one named worker, read from the database."""

    model_config = ConfigDict(frozen=True)

    name: str
    state: State
    generation: int
    owner: Owner | None
    work_query: str
    worker: str
    config: Config
    last_work_at: datetime | None
    next_run_at: datetime | None
    batches: int
    consecutive_failures: int
    last_error: str | None
    last_error_at: datetime | None = None
    created_at: datetime | None = None
    config_error: str | None = None
    """Why the stored config could not be read (then ``config`` shows the default Config):
    a row edited by hand, say. Its loop cannot run until a ping with a valid config repairs it."""
    owner_alive: bool = False
    """A live process holds the name right now (its owner's session lock is held)."""
    stale: bool = False
    """It should be running (``running``, or ``waiting`` and due) but no live process holds it:
    the work waits for a host that can run it."""


class HostStatus(BaseModel):
    """One host process, as :func:`batchloop.list_hosts` reads it from the database."""

    model_config = ConfigDict(frozen=True)

    host_id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_at: datetime
    alive: bool
    """Some connection of the host (its control or pool connections, which carry its
    application name ``batchloop/<host_id>``) is open on the server, and its heartbeat is at
    most ``HOST_ALIVE_WITHIN`` (60 s, the longest heartbeat_interval) old."""
    owned: list[str] = Field(default_factory=list)
    """Names whose loops it runs: their session lock is held and their state names it."""


class Health(BaseModel):
    """What :meth:`batchloop.Host.health` sees of its own host."""

    model_config = ConfigDict(frozen=True)

    ok: bool
    connected: bool
    """The control connection is alive."""
    heartbeat_age: float | None
    """Seconds since the last successful heartbeat; None before the first."""
    owned: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)
    """Human-readable, one per problem; empty when ok."""


class TickReport(BaseModel):
    """What one :func:`batchloop.tick` pass did."""

    checked: list[str] = Field(default_factory=list)
    drained: list[str] = Field(default_factory=list)
    busy: list[str] = Field(default_factory=list)
    """Names another live loop held; left alone."""
    failed: list[TickFailure] = Field(default_factory=list)
    batches: int = 0


class TickFailure(BaseModel):
    name: str
    error: str


TickReport.model_rebuild()
