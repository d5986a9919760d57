"""The values users hand to batchloop and get back from it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

T = TypeVar("T")

State = Literal["idle", "waiting", "running", "stopped"]


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
        if self.timeout is not None and not self.timeout >= 0:
            raise ValueError(f"Idle.timeout must be >= 0 or None, got {self.timeout!r}")
        if not self.cooldown >= 0:
            raise ValueError(f"Idle.cooldown must be >= 0, got {self.cooldown!r}")
        if not self.poll_interval > 0:
            raise ValueError(f"Idle.poll_interval must be > 0, got {self.poll_interval!r}")


@dataclass(frozen=True, slots=True)
class Debounce:
    """Returned by a worker: do not run again, and ignore pings, for ``seconds``."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds >= 0:
            raise ValueError(f"Debounce.seconds must be >= 0, got {self.seconds!r}")


class Config(BaseModel):
    """Per-name settings, stored with the worker and replaced whole when a ping passes one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    debounce: float = Field(default=0.0, ge=0.0, le=86_400.0, allow_inf_nan=False)
    """Delay before the first batch after a wake, so a burst accumulates."""
    monitor_lag: float = Field(default=60.0, ge=1.0, le=86_400.0, allow_inf_nan=False)
    """How long a frozen or unreachable owner may go unnoticed; also the retry backoff cap."""
    iteration_timeout: float | None = Field(default=None, gt=0.0, allow_inf_nan=False)
    """Cancel a work query plus worker that runs longer than this; counts as a failure."""


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
